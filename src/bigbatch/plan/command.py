"""`bigbatch plan`: the micro-batch and accum-freq for a global batch on a GPU, and the
predicted peak memory of a step.

The flags it shares with `bigbatch train` are train's own (config.add_options): the same
names, defaults and help. They are parsed before torch is imported: `--help` and a
mistyped flag answer at once.
"""

from __future__ import annotations

import argparse

from bigbatch.config import check_batch_sizes, check_step_options
from bigbatch.errors import ConfigError
from bigbatch.parse import add_options
from bigbatch.flags import Parser
from bigbatch.plan.sizes import DEFAULT_RESERVE, parse_memory

SHARED_WITH_TRAIN = ("model", "global_batch_size", "precision", "grad_checkpointing", "local_loss",
                     "gather_with_grad", "offload_inputs", "siglip", "force_patch_dropout",
                     "loss_tile_size", "ema_decay", "distill_model", "threads")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bigbatch plan",
        description="Pick the micro-batch and accum-freq for a global batch on a GPU, and "
                    "predict the peak memory of a step, term by term. Needs no GPU. Flags "
                    "shared with bigbatch train mean what they mean there.")
    parser.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 24GiB, 80GB, 40960MiB")
    parser.add_argument("--world-size", type=int, default=1, help="number of GPUs (default: 1)")
    parser.add_argument("--batch-size", default="auto",
                        help="micro-batch per GPU, or 'auto': the largest that fits and divides "
                             "global-batch-size / world-size (default: auto)")
    parser.add_argument("--accum-freq", type=int,
                        help="micro-batches per step (default: derived from --global-batch-size, else 1)")
    add_options(parser, *SHARED_WITH_TRAIN, precision=dict(
        help="as for bigbatch train, but 'auto' = amp, the CUDA default (default: 'auto')"),
                gather_with_grad=dict(help="as for bigbatch train, which needs it with --local-loss "
                                           "(the plan is the same either way)"))
    parser.add_argument("--reserve", type=float, default=DEFAULT_RESERVE,
                        help=f"fraction of the GPU kept free (default: {DEFAULT_RESERVE})")
    parser.add_argument("--device", default="cpu", type=_device,
                        help="'cpu': a meta estimate, no GPU needed (default); 'cuda' (or cuda:N): a real probe")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the chosen micro-batch, accum-freq and the predicted peak; 1 if it does not fit."""
    args = build_parser().parse_args(argv)
    if not 0 <= args.reserve < 1:
        raise ConfigError("--reserve is a fraction of the GPU's memory in [0, 1), e.g. 0.1")
    if args.batch_size != "auto":
        args.batch_size = _integer("batch-size", args.batch_size)
    check_batch_sizes(global_batch_size=args.global_batch_size, batch_size=args.batch_size,
                      accum_freq=args.accum_freq, world_size=args.world_size)
    check_step_options(args)
    W = args.world_size
    memory = parse_memory(args.gpu_memory)
    import torch

    from bigbatch import plan
    from bigbatch.device import set_threads

    set_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu for a "
                          f"meta estimate (it needs no GPU)")
    options = plan.PlanOptions.from_config(args, world_size=W, device=args.device, gpu_memory=memory,
                                           reserve=args.reserve)
    b, K = batch_layout(args, options)
    estimate = plan.estimate_memory(options, batch_size=b, accum_freq=K)
    print(plan.format_plan(estimate))
    print(f"\nflags: --batch-size {b} --accum-freq {K}"
          + (" --grad-checkpointing" if args.grad_checkpointing else "")
          + (" --offload-inputs" if args.offload_inputs else "")
          + (" --local-loss --gather-with-grad" if W > 1 and args.local_loss else ""))
    return 0 if estimate.fits else 1


def batch_layout(args: argparse.Namespace, options) -> tuple[int, int]:
    """The micro-batch (given, or the largest that fits) and accum-freq (given or derived)."""
    from bigbatch import plan

    G, W = args.global_batch_size, args.world_size
    if args.batch_size == "auto":
        if G is None and args.accum_freq is None:
            raise ConfigError("--batch-size auto needs --global-batch-size (or a fixed --accum-freq)")
        if G is not None and args.accum_freq is not None:  # both fixed: so is the micro-batch
            if G % (W * args.accum_freq):
                raise ConfigError(f"--global-batch-size {G} is not --accum-freq {args.accum_freq} x "
                                  f"--world-size {W} whole micro-batches: use an --accum-freq that "
                                  f"divides {G // W}, or drop it and the plan picks both")
            b = G // (W * args.accum_freq)
        else:
            b = plan.find_max_batch_size(options, global_batch_size=G, accum_freq=args.accum_freq)
    else:
        b = args.batch_size
    if G is None:
        return b, args.accum_freq or 1
    K = plan.derive_accum_freq(G, b, W)
    if args.accum_freq is not None and args.accum_freq != K:
        raise ConfigError(f"--accum-freq {args.accum_freq} disagrees with --global-batch-size {G} "
                          f"/ (--batch-size {b} x --world-size {W}) = {K}: drop one of them")
    return b, K


def _integer(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--{name} {text!r}: a positive integer or 'auto'") from None


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: 'cpu' (a meta estimate) or 'cuda' / 'cuda:N' (a probe)")
