"""`bigbatch plan`: the micro-batch and accum-freq for a global batch on a GPU, and the
predicted peak memory of a step (bigbatch.plan does the work).

The flags are parsed before bigbatch.plan (and torch) is imported: `--help` and a
mistyped flag answer at once.
"""

from __future__ import annotations

import argparse

from bigbatch.errors import ConfigError
from bigbatch.flags import Parser

RESERVE_HELP = "0.1"  # bigbatch.plan.DEFAULT_RESERVE, which imports torch (a test keeps them equal)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bigbatch plan",
        description="Pick the micro-batch and accum-freq for a global batch on a GPU, and "
                    "predict the peak memory of a step, term by term. Needs no GPU.")
    parser.add_argument("--model", required=True,
                        help="open_clip model name, bigbatch-tiny/bigbatch-small, or a model config JSON")
    parser.add_argument("--global-batch-size", type=int,
                        help="samples per optimizer step over all GPUs "
                             "(default: batch-size x accum-freq x world-size)")
    parser.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 24GiB, 80GB, 40960MiB")
    parser.add_argument("--batch-size", default="auto",
                        help="micro-batch per GPU, or 'auto': the largest that fits and divides "
                             "global-batch-size / world-size (default: auto)")
    parser.add_argument("--accum-freq", type=int, help="micro-batches per step (default: derived)")
    parser.add_argument("--world-size", type=int, default=1, help="number of GPUs (default: 1)")
    parser.add_argument("--precision", default="amp_bf16", choices=["auto", "fp32", "amp", "amp_bf16"],
                        help="as for bigbatch train (default: amp_bf16)")
    parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--local-loss", action=argparse.BooleanOptionalAction, default=True,
                        help="with --world-size > 1: --local-loss --gather-with-grad (default: on)")
    parser.add_argument("--offload-inputs", action=argparse.BooleanOptionalAction, default=False,
                        help="the step's cached inputs wait in host memory (default: off)")
    parser.add_argument("--siglip", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--force-patch-dropout", type=float)
    parser.add_argument("--tile-size", type=int, help="the loss's tile (default: the loss's rule)")
    parser.add_argument("--reserve", type=float,
                        help=f"fraction of the GPU kept free (default: {RESERVE_HELP})")
    parser.add_argument("--device", default="cpu",
                        help="'cpu': a meta estimate, no GPU needed (default); 'cuda': a real probe")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's choice, one per core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the chosen micro-batch, accum-freq and the predicted peak; 1 if it does not fit."""
    args = build_parser().parse_args(argv)
    if args.reserve is not None and not 0 <= args.reserve < 1:
        raise ConfigError("--reserve is a fraction of the GPU's memory in [0, 1), e.g. 0.1")
    W = args.world_size
    if W < 1:
        raise ConfigError(f"--world-size must be at least 1, got {W}")
    import torch

    from bigbatch import plan
    from bigbatch.device import set_threads

    set_threads(args.threads)
    memory = plan.parse_memory(args.gpu_memory)
    reserve = plan.DEFAULT_RESERVE if args.reserve is None else args.reserve
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu for a "
                          f"meta estimate (it needs no GPU)")
    settings = dict(world_size=W, precision=args.precision, grad_checkpointing=args.grad_checkpointing,
                    local_loss=args.local_loss, tile=args.tile_size, device=args.device,
                    siglip=args.siglip, offload_inputs=args.offload_inputs,
                    force_patch_dropout=args.force_patch_dropout, reserve=reserve)
    G = args.global_batch_size
    if args.batch_size == "auto":
        if G is None and args.accum_freq is None:
            raise ConfigError("--batch-size auto needs --global-batch-size (or a fixed --accum-freq)")
        b = plan.find_max_batch_size(args.model, gpu_memory_bytes=memory, global_batch_size=G,
                                     accum_freq=args.accum_freq, **settings)
    else:
        try:
            b = int(args.batch_size)
        except ValueError:
            raise ConfigError(f"--batch-size {args.batch_size!r}: a positive integer or 'auto'") from None
    if G is None:
        K = args.accum_freq or 1
    else:
        K = plan.derive_accum_freq(G, b, W)
        if args.accum_freq is not None and args.accum_freq != K:
            raise ConfigError(f"--accum-freq {args.accum_freq} disagrees with --global-batch-size {G} "
                              f"/ (--batch-size {b} x --world-size {W}) = {K}: drop one of them")
    estimate = plan.estimate_memory(args.model, batch_size=b, accum_freq=K, gpu_memory=memory, **settings)
    print(plan.format_plan(estimate))
    print(f"\nflags: --batch-size {b} --accum-freq {K}"
          + (" --grad-checkpointing" if args.grad_checkpointing else "")
          + (" --offload-inputs" if args.offload_inputs else "")
          + (" --local-loss --gather-with-grad" if W > 1 and args.local_loss else ""))
    return 0 if estimate.fits else 1
