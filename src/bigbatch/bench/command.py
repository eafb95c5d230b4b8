"""`bigbatch bench`: bigbatch's accumulated step against two plain ones (the global batch in
one pass; the same micro-batch without accumulation) and open_clip_train's, side by side
(samples/s, peak memory), plus the loss working set and, on CUDA, the
largest batch. Writes bench/bench-<device>-<model>-b<b>x<K>.{json,md,png} and prints the table.

    bigbatch bench                  # CPU defaults: bigbatch-small, b=8, K=4, fp32, 2 threads
    bigbatch bench --device cuda --model ViT-B-32 --batch-size 256 --accum-freq 8 --precision amp

The flags are parsed before torch is imported: `--help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bigbatch.errors import ConfigError
from bigbatch.flags import Parser

CPU_LOSS_SIZES = [4096, 8192, 16384, 32768, 65536]
CUDA_LOSS_SIZES = CPU_LOSS_SIZES + [131072, 262144]


class DefaultsInHelp(argparse.HelpFormatter):
    """Each help ends with its default, unless it names one already or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="bigbatch bench", description="bigbatch accumulated vs plain vs open_clip_train accumulated, side by side "
                    "(samples/s, peak memory), plus the loss working set.",
        formatter_class=DefaultsInHelp)
    p.add_argument("--model", default="bigbatch-small", help="open_clip model name or bigbatch config")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size b")
    p.add_argument("--accum-freq", type=int, default=4, help="micro-batches per step K")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (one step of each configuration each)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed rounds first")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16"],
                   help="as for bigbatch train")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the timed steps")
    p.add_argument("--wd", type=float, default=0.2, help="weight decay of the timed steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and inputs")
    p.add_argument("--out", default="bench", help="folder for the JSON, markdown and PNG")
    p.add_argument("--skip-peer", action="store_true", help="do not run open_clip_train")
    p.add_argument("--skip-memory", action="store_true", help="no memory step per configuration")
    p.add_argument("--loss-sizes", default=None,
                   help="comma-separated N for the loss working set ('' to skip); default "
                        f"{','.join(map(str, CPU_LOSS_SIZES))} (+131072,262144 on CUDA)")
    p.add_argument("--loss-dim", type=int, default=512, help="feature dimension D of the loss study")
    p.add_argument("--loss-tile", type=int, default=None,
                   help="tile size for the tiled loss (default: the loss's own, 4096)")
    p.add_argument("--loss-measure-max", type=int, default=None,
                   help="largest N run for real (default 8192 on CPU, all on CUDA); larger N analytic")
    p.add_argument("--max-batch-cap", type=int, default=262144, help="CUDA batch search: stop here")
    p.add_argument("--max-batch-seconds", type=float, default=120.0,
                   help="CUDA batch search: stop doubling after a step this long")
    p.add_argument("--skip-max-batch", action="store_true", help="no largest-batch search on CUDA")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each configuration (torch.profiler) and time the "
                        "phases (forward without grad, forward+backward) to explain the ratios")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="wait up to this many seconds for the 1-minute load average to fall below "
                        "--quiet-load before starting")
    p.add_argument("--quiet-load", type=float, default=1.5, help="the load average --wait-quiet waits for")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked, with the device and the loss sizes resolved."""
    args = build_parser().parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.precision == "amp" and device.type != "cuda":
        raise ConfigError("--precision amp (float16) needs CUDA: on CPU use fp32 or amp_bf16")
    if min(args.batch_size, args.accum_freq, args.steps) < 1 or args.warmup_steps < 0:
        raise ConfigError("--batch-size, --accum-freq and --steps must be >= 1, --warmup-steps >= 0")
    if args.loss_sizes is None:
        args.loss_sizes = CUDA_LOSS_SIZES if device.type == "cuda" else CPU_LOSS_SIZES
    else:
        args.loss_sizes = [int(s) for s in args.loss_sizes.split(",") if s.strip()]
    if args.loss_measure_max is None:
        args.loss_measure_max = 2**62 if device.type == "cuda" else 8192
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bigbatch.bench.report import markdown
    from bigbatch.bench.runner import run

    result = run(args)
    print()
    print(markdown(result))
    print(f"written to {Path(args.out).resolve()}")
    return 0
