"""--torchcompile's speed-up: bigbatch's accumulated step, eager and compiled, side by side.

`measure` builds the model twice from one seed, one copy left eager and one compiled in
place by `bigbatch.compiled.compile_model` (what `--torchcompile` does), and times the step
the trainer takes on the same K micro-batches of random uint8 images and token ids:
`cached_backward` (pass 1 without grad, the loss once, pass 2 recomputes) and an AdamW
step. The compiled copy's first step compiles both grad modes' graphs; it is timed on its
own. Then rounds alternate the order of eager and compiled, so that the load of a shared
machine hits both alike, and the speed-up is the median of the paired per-round ratios
(ratios measured side by side, never an asserted time). With --plain, two more copies
take the same samples as one micro-batch (K = 1), eager and compiled: is the accumulated
step's share of the plain one's speed (accumulated/plain) the same under compile?

Usage (from the repository's root; scripts/bench_compile.py calls the same):
  python -m bigbatch.bench.compile_speed           # CPU: bigbatch-small, 32 x 4, 7 rounds
  python -m bigbatch.bench.compile_speed --smoke   # seconds: tiny model, the 'eager' backend
  python -m bigbatch.bench.compile_speed --plain   # and the plain step, eager and compiled
Writes <out>/compile-<device>.{json,md,png} (default out: bench/) and prints the table.
scripts/gpu_check.py --parts compile (and compile_ratio, with --plain) reports the GPU
figures with the same `measure`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bigbatch.bench.environment import device_name, load_average



def measure(model: str, batch: int, accum: int, *, device: str | torch.device = "cpu",
            backend: str = "inductor", precision: str = "fp32", rounds: int = 7, plain: bool = False,
            before_timing: Callable[[], object] | None = None) -> dict:
    """Seconds per accumulated step (batch x accum), eager and compiled, paired by round.

    plain: also the same samples as one micro-batch (K = 1), eager and compiled, each on a
    model of its own, for the accumulated/plain ratio in both modes (`ratio_eager`,
    `ratio_compiled`). The plain copy is compiled static at its size, as a
    `--torchcompile --accum-freq 1` run compiles its first shape.
    before_timing is called once compiled, before the timed steps (gpu_check waits there
    for the device to itself)."""
    from bigbatch.accumulation import cached_backward
    from bigbatch.device import autocast_factory, use_fast_cuda_math
    from bigbatch.losses import create_loss

    device = torch.device(device)
    if device.type == "cuda":
        use_fast_cuda_math()  # as a --torchcompile run on CUDA computes
    names = ["eager", "compiled"] + (["plain_eager", "plain_compiled"] if plain else [])
    # compiled accumulated first: it compiles the first size static, as the trainer does;
    # compiled later, the plain copy's other size would otherwise turn its graph dynamic
    nets = {name: _model(model, device, backend if "compiled" in name else None,
                         dynamic=False if name == "plain_compiled" else None) for name in names}
    pin = device.type == "cuda"
    micro_batches = _micro_batches(nets["eager"][0], batch, accum, pin=pin)
    one_batch = [tuple(torch.cat(parts) for parts in zip(*micro_batches))]
    if pin:  # copied as the micro-batches are: asynchronously, from pinned memory
        one_batch = [tuple(t.pin_memory() for t in one_batch[0])]
    autocast, loss_fn = autocast_factory(precision, device), create_loss("clip")

    def step(name: str) -> float:
        net, optimizer = nets[name]
        _sync(device)
        start = time.perf_counter()
        batches = one_batch if name.startswith("plain") else micro_batches
        inputs = [tuple(t.to(device, non_blocking=True) for t in mb) for mb in batches]
        cached_backward(net, inputs, loss_fn, autocast=autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    # the first compiled steps compile: pass 1's no-grad graph and pass 2's training graph
    compile_seconds = {name: step(name) for name in names if "compiled" in name}
    if before_timing is not None:
        before_timing()
    for name in names:
        if "compiled" not in name:
            step(name)  # warm-up: allocator, thread pools
    times = {name: [] for name in names}
    for r in range(rounds):  # the order alternates, so that a shared machine's load hits all alike
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(step(name))
    samples = batch * accum
    ratios = _paired(times["eager"], times["compiled"])  # > 1: compiled is faster
    result = {"model": model, "backend": backend, "precision": precision, "batch": f"{batch} x {accum}",
              "samples_per_step": samples, "rounds": rounds, "compile_seconds": round(compile_seconds["compiled"], 2),
              "eager_seconds": times["eager"], "compiled_seconds": times["compiled"],
              "eager_samples_per_s": _rate(samples, times["eager"]),
              "compiled_samples_per_s": _rate(samples, times["compiled"]),
              "speedup": round(statistics.median(ratios), 3), "speedup_per_round": [round(x, 3) for x in ratios],
              "speedup_quartiles": [round(q, 3) for q in _quartiles(ratios)]}
    if plain:  # accumulated/plain: the plain step's time over the accumulated one's, per round
        result |= {"plain_compile_seconds": round(compile_seconds["plain_compiled"], 2),
                   "plain_eager_seconds": times["plain_eager"], "plain_compiled_seconds": times["plain_compiled"],
                   "plain_eager_samples_per_s": _rate(samples, times["plain_eager"]),
                   "plain_compiled_samples_per_s": _rate(samples, times["plain_compiled"]),
                   **_median_and_quartiles("ratio_eager", _paired(times["plain_eager"], times["eager"])),
                   **_median_and_quartiles("ratio_compiled", _paired(times["plain_compiled"], times["compiled"])),
                   "plain_speedup": round(statistics.median(
                       _paired(times["plain_eager"], times["plain_compiled"])), 3)}
    return result


def _model(name: str, device: torch.device, backend: str | None, dynamic: bool | None):
    """A fresh copy from one seed (every copy starts alike) and its AdamW; compiled in place
    by what --torchcompile calls when a backend is given."""
    from bigbatch.compiled import compile_model
    from bigbatch.model import create_model

    torch.manual_seed(0)
    net = create_model(name, device=device, tokenizer=False).model
    if backend is not None:
        compile_model(net, backend, dynamic=dynamic)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-5)


def _median_and_quartiles(key: str, ratios: list[float]) -> dict:
    return {key: round(statistics.median(ratios), 3), f"{key}_quartiles": [round(q, 3) for q in _quartiles(ratios)]}


def _paired(slower: list[float], faster: list[float]) -> list[float]:
    return [s / f for s, f in zip(slower, faster)]


def _rate(samples: int, seconds: list[float]) -> float:
    return round(samples / statistics.median(seconds), 1)


def _micro_batches(net, batch: int, accum: int, pin: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K micro-batches of random uint8 images (the model normalises them) and token ids."""
    g = torch.Generator().manual_seed(0)
    size = net.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    made = [(torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=g),
             torch.randint(1, int(net.vocab_size), (batch, int(net.context_length)), generator=g))
            for _ in range(accum)]
    return [tuple(t.pin_memory() for t in mb) for mb in made] if pin else made


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the report


def environment(device: torch.device) -> dict:
    return {"device": device_name(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_start": load_average()}


def markdown(report: dict) -> str:
    r, env = report["result"], report["environment"]
    lines = [f"### --torchcompile: bigbatch's accumulated step on {env['device']}", "",
             f"{r['model']}, {r['precision']}, micro-batch x accum-freq = {r['batch']}, torch.compile backend "
             f"{r['backend']}; {r['rounds']} rounds, eager and compiled alternating in order; {env['date']}; "
             f"torch {env['torch']}; load average {env['load_average_start']} -> {env.get('load_average_end')}", "",
             f"`{report['command']}`", "",
             "| round | eager (s/step) | compiled (s/step) | speed-up (eager / compiled) |", "|---:|---:|---:|---:|"]
    for i, (e, c, s) in enumerate(zip(r["eager_seconds"], r["compiled_seconds"], r["speedup_per_round"]), 1):
        lines.append(f"| {i} | {e:.3f} | {c:.3f} | {s:.3f} |")
    q1, q3 = r["speedup_quartiles"]
    lines += ["", f"samples/s (median): eager {r['eager_samples_per_s']}, compiled {r['compiled_samples_per_s']}; "
                  f"speed-up {r['speedup']}x (paired median, q1 {q1}, q3 {q3}); the first compiled step "
                  f"(compiling both grad modes) took {r['compile_seconds']} s.", ""]
    if "ratio_compiled" in r:
        lines += plain_table(r) + [""]
    return "\n".join(lines)


def plain_table(r: dict) -> list[str]:
    """The accumulated step against the same samples in one micro-batch, eager and compiled."""
    return ["| step | eager samples/s | compiled samples/s | compiled / eager |", "|---|---:|---:|---:|",
            f"| plain, {r['samples_per_step']} in one micro-batch | {r['plain_eager_samples_per_s']} | "
            f"{r['plain_compiled_samples_per_s']} | {r['plain_speedup']} |",
            f"| accumulated, {r['batch']} | {r['eager_samples_per_s']} | {r['compiled_samples_per_s']} | "
            f"{r['speedup']} |",
            f"| accumulated / plain | {r['ratio_eager']} | {r['ratio_compiled']} | |", "",
            f"Ratios are medians of per-round pairs (accumulated / plain: quartiles "
            f"{r['ratio_eager_quartiles']} eager, {r['ratio_compiled_quartiles']} compiled); the plain "
            f"copy compiled (static) in {r['plain_compile_seconds']} s."]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["result"]
    samples = r["samples_per_step"]
    rounds = range(1, len(r["eager_seconds"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in ("eager", "compiled", "plain_eager", "plain_compiled"):
        if f"{name}_seconds" in r:
            left.plot(rounds, [samples / s for s in r[f"{name}_seconds"]], "o-" if "plain" not in name else "s--",
                      label=name.replace("_", " ") if "plain" in name else f"accumulated {name}")
    left.set(xlabel="round", ylabel="samples/s", title=f"{r['model']}, {r['batch']}")
    left.legend()
    right.bar(rounds, r["speedup_per_round"], color="tab:green")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="round", ylabel="eager / compiled time", title=f"speed-up, median {r['speedup']}x")
    fig.suptitle(f"--torchcompile ({r['backend']}) on {report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bigbatch-small", help="open_clip model name or bigbatch config")
    p.add_argument("--batch", type=int, default=32, help="micro-batch size")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (accum-freq)")
    p.add_argument("--rounds", type=int, help="timed rounds, each one eager and one compiled step (default: 7)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--plain", action="store_true",
                   help="also the same samples in one micro-batch, eager and compiled: accumulated/plain in both modes")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench", help="folder of the JSON, markdown and PNG (default: bench/)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds, for the tests: bigbatch-tiny, 4 x 2, the 'eager' backend, 1 round")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.accum, args.backend = "bigbatch-tiny", 4, 2, "eager"
    args.rounds = args.rounds or (1 if args.smoke else 7)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"command": " ".join(["python -m bigbatch.bench.compile_speed", *(sys.argv[1:] if argv is None else argv)]),
              "environment": environment(device)}
    report["result"] = measure(args.model, args.batch, args.accum, device=device, backend=args.backend,
                               precision=args.precision, rounds=args.rounds, plain=args.plain)
    report["environment"]["load_average_end"] = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compile-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"written: {stem}.json, .md, .png")
    return report


if __name__ == "__main__":
    main()
