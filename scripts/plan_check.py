#!/usr/bin/env python
"""`bigbatch plan` against measured steps, on CPU, for open_clip models the tests never build.

    python scripts/plan_check.py              # 11 configurations: 7 minutes on 2 Xeon cores, 35 on 2
                                              # AVX2-only cores (no native bf16: its 3 bf16 rows)
    python scripts/plan_check.py --smoke      # the test models, seconds (the test suite runs it)
    python scripts/plan_check.py --configs EVA02-B-16:2:2 RN50x4:2:2:gc ViT-S-16:8:2::amp_bf16 \
        ViT-B-16-SigLIP:2:2:gc+siglip --name plan-vs-measured-cpu-more   # MODEL:b:K[:OPTIONS][:precision]

For each configuration: the plan's peak (meta estimate on fake tensors, for the CPU) and the
peak measured over one real training step (bigbatch.plan.measure_peak: the trainer's
inputs, engine, loss and fused AdamW, under bigbatch's meter), side by side, and the error.
The meter counts every tensor the step makes while it lives; scratch memory inside a
kernel is not a tensor, so it is not counted (on a GPU, max_memory_allocated sees it:
scripts/gpu_check.sh's plan part).
Writes OUT/plan-vs-measured-cpu.{json,md,png} (default OUT: bench/) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
MiB = 2 ** 20

# (model, micro-batch, K, grad checkpointing, precision): ViTs, ResNets, ConvNeXt, MobileCLIP,
# CoCa; weights dominate the small batches, activations the larger ones
CONFIGS = [("RN50", 2, 2, False, "fp32"), ("RN50", 8, 2, False, "fp32"), ("RN50", 2, 1, True, "fp32"),
           ("ViT-S-32", 4, 2, False, "fp32"), ("ViT-S-32", 32, 2, False, "fp32"),
           ("ViT-S-16", 2, 2, True, "fp32"), ("ViT-S-16", 8, 2, False, "amp_bf16"),
           ("convnext_tiny", 8, 2, True, "fp32"), ("MobileCLIP-S1", 2, 2, False, "fp32"),
           ("coca_ViT-B-32", 4, 2, False, "amp_bf16"),
           ("coca_ViT-B-32", 8, 2, True, "amp_bf16")]  # 608 caption rows: the loss's chunks capped
SMOKE = [(str(ASSETS / "test-clip.json"), 4, 2, False, "fp32"), (str(ASSETS / "test-coca.json"), 4, 2, True, "fp32")]


def parse_config(spec: str) -> tuple:
    """MODEL:b:K[:OPTIONS][:precision] -> a CONFIGS row. OPTIONS: gc (grad checkpointing),
    siglip, or both joined by '+'; fp32 unless a precision is given."""
    fields = spec.split(":") + ["", ""]
    options = set(filter(None, fields[3].split("+")))
    if not 3 <= spec.count(":") + 1 <= 5 or not options <= {"gc", "siglip"} or not all(
            f.isdigit() for f in fields[1:3]):
        raise argparse.ArgumentTypeError(f"{spec!r}: write MODEL:b:K[:OPTIONS][:precision], OPTIONS gc, "
                                         f"siglip or gc+siglip, e.g. RN50:8:2:gc")
    return fields[0], int(fields[1]), int(fields[2]), "gc" in options, fields[4] or "fp32", "siglip" in options


def check(model: str, batch_size: int, accum_freq: int, checkpointing: bool, precision: str,
          siglip: bool = False) -> dict:
    from bigbatch import plan

    start = time.time()
    measured, _ = plan.measure_peak(model, batch_size=batch_size, accum_freq=accum_freq,
                                    grad_checkpointing=checkpointing, precision=precision, siglip=siglip)
    options = plan.PlanOptions(model, precision=precision, grad_checkpointing=checkpointing, siglip=siglip,
                               target="cpu")
    planned = plan.estimate_memory(options, batch_size=batch_size, accum_freq=accum_freq)
    return {"model": Path(model).stem, "batch_size": batch_size, "accum_freq": accum_freq,
            "grad_checkpointing": checkpointing, "siglip": siglip, "precision": precision, "measured_bytes": measured,
            "planned_bytes": planned.peak, "phase": planned.phase, "activations_bytes": planned.activations,
            "error_percent": round(100 * (planned.peak - measured) / measured, 1),
            "seconds": round(time.time() - start, 1)}


def markdown(report: dict) -> str:
    models = " The test models (--smoke)." if "--smoke" in report["command"] else " Models the test suite never builds."
    lines = [f"# `bigbatch plan` against measured CPU steps ({report['device']})", "",
             f"{report['date']}; torch {report['torch']}; `{report['command']}`. Measured: the peak of one "
             "real training step (bigbatch.plan.measure_peak; bigbatch's meter: every tensor the step makes "
             "while it lives, not scratch memory inside kernels); planned: the meta estimate for the CPU." + models, "",
             "| model | b x K | grad ckpt | precision | measured MiB | planned MiB | error | peak phase |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']}{' --siglip' if r.get('siglip') else ''} | {r['batch_size']} x {r['accum_freq']} | {'yes' if r['grad_checkpointing'] else ''} | "
                     f"{r['precision']} | {r['measured_bytes'] / MiB:,.1f} | {r['planned_bytes'] / MiB:,.1f} | "
                     f"{r['error_percent']:+.1f}% | {r['phase']} |")
    errors = [abs(r["error_percent"]) for r in report["rows"]]
    lines += ["", f"Largest error {max(errors):.1f}% over {len(errors)} configurations."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{r['model']}\n{r['batch_size']}x{r['accum_freq']}{' gc' if r['grad_checkpointing'] else ''}{' siglip' if r.get('siglip') else ''}"
              f"{' bf16' if r['precision'] != 'fp32' else ''}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured_bytes"] / MiB for r in rows], 0.4, label="measured step")
    ax.bar([i + 0.2 for i in x], [r["planned_bytes"] / MiB for r in rows], 0.4, label="bigbatch plan")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['error_percent']:+.1f}%", (i + 0.2, r["planned_bytes"] / MiB), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("peak MiB")
    ax.set_title(f"bigbatch plan against measured CPU steps ({report['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the test models only (seconds)")
    parser.add_argument("--configs", nargs="+", type=parse_config, metavar="MODEL:b:K[:gc][:precision]",
                        help="check these instead of the 11 (precision: fp32 unless given)")
    parser.add_argument("--name", default=None, help="the report's file stem (default: plan-vs-measured-cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="folder for the report")
    args = parser.parse_args(argv)
    import torch

    rows = []
    for config in SMOKE if args.smoke else args.configs or CONFIGS:
        rows.append(check(*config))
        r = rows[-1]
        print(f"{r['model']} {r['batch_size']}x{r['accum_freq']} gc={r['grad_checkpointing']} siglip={r['siglip']} {r['precision']}: "
              f"measured {r['measured_bytes'] / MiB:.1f} MiB, planned {r['planned_bytes'] / MiB:.1f} MiB, "
              f"{r['error_percent']:+.1f}% ({r['phase']}) [{r['seconds']} s]", flush=True)
    from bigbatch.bench.environment import device_name
    report = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python scripts/plan_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or "plan-vs-measured-cpu" + ("-smoke" if args.smoke else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
