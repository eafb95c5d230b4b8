#!/usr/bin/env python
"""End to end: whole CLI runs of bigbatch and open_clip_train, side by side, on real files.

What a user runs, from the shell prompt to the exit: interpreter start, imports, model
build, data loading (PNG/JPEG decode in loader workers), the training steps, checkpoints
and the end-of-run work. Each contender gets the same data, model and flags:

  data       --samples drawn shapes (bigbatch.data.shapes), written once as files, half
             PNG and half JPEG, listed in a tab-separated CSV; the same files also go into
             webdataset shards (bigbatch only: open_clip_train's shard path needs
             webdataset <= 0.2.86; bigbatch runs on newer ones).
  model      a custom config (--model-config), given to bigbatch as its JSON path and to
             the peer as `--model local-dir:DIR` (DIR/open_clip_config.json).
  flags      --batch-size B --accum-freq K --workers W --epochs E --precision P, the
             same lr, warmup, weight decay, seed, logging and checkpoint frequency.

Contenders (per configuration B x K with W workers):
  open_clip_train   `python -m open_clip_train.main`, CSV
  bigbatch csv      `python -m bigbatch train`, CSV
  bigbatch wds      `python -m bigbatch train`, webdataset shards of the same files

How it is measured (no time is ever asserted):
- wall: the process's wall time, measured here around the subprocess.
- the training phase and the data wait, measured alike in both processes by this
  script run as their launcher (`--child`): every DataLoader iterator's `__next__` is
  timed (the time the trainer waits for data), and a global optimizer post-step hook
  marks the last step. Training phase = first batch asked for -> last optimizer step;
  samples/s = epochs x samples / training phase; data share = data wait / training phase.
- rounds: --pairs rounds, each runs every contender once, the order rotated per round,
  so machine load hits all alike. Reported: medians and ranges, and the ratio of each
  contender's wall time to the peer's, paired round by round.

Usage:
  python scripts/bench_e2e.py                          # CPU: b16x4 w1 and b32x4 w2, 3 pairs
  python scripts/bench_e2e.py --configs 16x4x1 --pairs 1 --samples 256
Writes bench/e2e-<device>.{json,md,png} and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER, CSV, WDS = "open_clip_train", "bigbatch csv", "bigbatch wds"
CONTENDERS = (PEER, CSV, WDS)
DEFAULT_MODEL = {  # ~3.4 M parameters (most in the token embedding), 32 px
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "mlp_ratio": 4.0,
                   "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="16x4x1,32x4x2",
                   help="comma-separated BATCHxACCUMxWORKERS (default 16x4x1,32x4x2)")
    p.add_argument("--samples", type=int, default=1408, help="images in the data (default 1408: whole steps of 128)")
    p.add_argument("--image-size", type=int, default=64, help="side of the drawn images in pixels")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3, help="rounds, each running every contender once")
    p.add_argument("--model-config", help="open_clip model config JSON (default: a 3.4 M-parameter ViT)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", help="both trainers' --precision (default fp32; amp_bf16 on a GPU)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {', '.join(CONTENDERS)}")
    p.add_argument("--profile", action="store_true",
                   help="also one profiled bigbatch csv run per config: seconds by phase, to e2e-profile-<device>.md")
    p.add_argument("--bigbatch-src", help="PYTHONPATH for bigbatch's runs (e.g. an older checkout's src)")
    p.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    p.add_argument("--report", metavar="JSON", help="only remake the tables and plot of a saved result")
    p.add_argument("--out", default=str(ROOT / "bench"), help="where the results go (default bench/)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- launcher (child)

def run_child(record: str, command: list[str], profile: bool = False) -> None:
    """Run `-m MODULE ARGS...` in this process, timing its data waits and optimizer steps
    (and with `profile`, bigbatch's phases)."""
    import atexit
    import resource
    import runpy

    from torch.utils.data import DataLoader

    marks = {"first_batch": None, "last_step": None, "data_seconds": 0.0, "batches": 0, "steps": 0,
             "launcher_start": time.perf_counter()}  # CLOCK_MONOTONIC: the parent's clock too

    class Timed:
        def __init__(self, iterator):
            self.iterator = iterator

        def __iter__(self):
            return self

        def __next__(self):
            start = time.perf_counter()
            if marks["first_batch"] is None:
                marks["first_batch"] = start
            try:
                return next(self.iterator)
            finally:
                marks["data_seconds"] += time.perf_counter() - start
                marks["batches"] += 1

        def __len__(self):
            return len(self.iterator)

    original_iter = DataLoader.__iter__
    DataLoader.__iter__ = lambda self: Timed(original_iter(self))

    def after_step(optimizer, args, kwargs):
        marks["last_step"] = time.perf_counter()
        marks["steps"] += 1

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(after_step)

    if profile:
        marks["phases"] = profile_bigbatch()

    def write():
        marks["exit"] = time.perf_counter()
        marks["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(record).write_text(json.dumps(marks))

    atexit.register(write)
    assert command[0] == "-m", command
    sys.argv = [command[1], *command[2:]]
    runpy.run_module(command[1], run_name="__main__", alter_sys=True)


def profile_bigbatch() -> dict:
    """Wrap bigbatch's phases with timers; returns the dict of seconds they fill in.

    Pass 1 is every forward before the step's loss (the last micro-batch's included), pass 2
    every forward after it plus the feature-gradient backwards; the loss is its forward and
    its backward; the optimizer is unscale/clip, the non-finite flag and the step."""
    import torch
    from torch import nn

    from bigbatch import cli
    from bigbatch.runlog import RunLog

    # imported as the CLI imports it (collector paused, wandb unused), so its start-up is the CLI's
    train = (cli.import_settled("bigbatch.train", ("wandb",)) if hasattr(cli, "import_settled")
             else importlib.import_module("bigbatch.train"))  # an older bigbatch (--bigbatch-src)

    seconds: dict = {}
    state = {"after_loss": False, "in_loss_backward": False}

    def add(phase: str, value: float) -> None:
        seconds[phase] = seconds.get(phase, 0.0) + value

    def timed(phase: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(phase, time.perf_counter() - start)
        return wrapper

    for phase, name in [("startup: model build", "build_model"), ("startup: data open", "open_data"),
                        ("startup: optimizer, resume", "build_optimizer"), ("startup: optimizer, resume", "resume"),
                        ("optimizer", "unscale_and_clip"), ("optimizer", "any_over_ranks"),
                        ("optimizer", "optimizer_step"), ("logging", "logged_scalars"),
                        ("checkpoint", "save"), ("plot", "plot_training_curves")]:
        if hasattr(train, name):  # an older bigbatch (--bigbatch-src) drew the plot in line
            setattr(train, name, timed(phase, getattr(train, name)))
    from bigbatch import checkpoint  # saving and resuming live there (older bigbatch: in train)
    for phase, name in [("startup: optimizer, resume", "resume_run"), ("checkpoint", "save_run")]:
        if hasattr(checkpoint, name):
            setattr(checkpoint, name, timed(phase, getattr(checkpoint, name)))
    if hasattr(train, "draw_curves"):  # in a thread: its time overlaps the main thread's
        draw_curves = train.draw_curves

        def timed_curves(*args, **kwargs):
            start, drawing = time.perf_counter(), draw_curves(*args, **kwargs)
            if drawing is not None:
                drawing.add_done_callback(lambda _: add("plot, in a thread", time.perf_counter() - start))
            return drawing
        train.draw_curves = timed_curves
    RunLog.train_step = timed("logging", RunLog.train_step)

    def engine(model, *args, **kwargs):
        state["after_loss"] = False
        return cached_backward(model, *args, **kwargs)

    cached_backward = train.cached_backward
    train.cached_backward = engine

    forward_start = {}

    def before(module, args):
        forward_start[id(module)] = time.perf_counter()

    def after(module, args, output):
        add("pass 2" if state["after_loss"] else "pass 1", time.perf_counter() - forward_start.pop(id(module)))

    build_model = train.build_model

    def hooked_build(*args, **kwargs):
        bundle, model, frozen = build_model(*args, **kwargs)
        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
        return bundle, model, frozen

    train.build_model = hooked_build

    build_losses = train.build_losses

    def timed_losses(*args, **kwargs):
        contrastive, caption = build_losses(*args, **kwargs)

        def loss(*a, **k):
            state["after_loss"] = True
            return timed("loss", contrastive)(*a, **k)
        return loss, caption

    train.build_losses = timed_losses

    tensor_backward, autograd_backward = torch.Tensor.backward, torch.autograd.backward

    def loss_backward(self, *args, **kwargs):
        state["in_loss_backward"] = True
        try:
            return timed("loss", tensor_backward)(self, *args, **kwargs)
        finally:
            state["in_loss_backward"] = False

    def slice_backward(*args, **kwargs):
        if state["in_loss_backward"]:
            return autograd_backward(*args, **kwargs)
        return timed("pass 2", autograd_backward)(*args, **kwargs)

    torch.Tensor.backward, torch.autograd.backward = loss_backward, slice_backward
    train_fn = train.train

    def timed_train(*args, **kwargs):
        seconds["train() called"] = time.perf_counter()
        return train_fn(*args, **kwargs)

    train.train = timed_train
    del nn
    return seconds


# --------------------------------------------------------------------------- data and model

def write_data(root: Path, samples: int, image_size: int) -> dict:
    """Image files (even rows PNG, odd rows JPEG), a CSV naming them, shards holding them."""
    import random

    from bigbatch.data.shapes import draw_sample

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(samples):
        image, caption, _ = draw_sample(rng, image_size)
        path = images / (f"{i:06d}.png" if i % 2 == 0 else f"{i:06d}.jpg")
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        rows.append((path, caption))
    csv = root / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    shards, per_shard = root / "shards", 256
    shards.mkdir(exist_ok=True)
    sizes = {}
    for n, start in enumerate(range(0, samples, per_shard)):
        name = f"{n:04d}.tar"
        with tarfile.open(shards / name, "w", format=tarfile.GNU_FORMAT) as tar:
            for path, caption in rows[start:start + per_shard]:
                tar.add(path, arcname=path.name)
                _add_text(tar, f"{path.stem}.txt", caption)
        sizes[name] = len(rows[start:start + per_shard])
    (shards / "sizes.json").write_text(json.dumps(sizes))
    pattern = str(shards / (f"{{0000..{len(sizes) - 1:04d}}}.tar" if len(sizes) > 1 else "0000.tar"))
    return {"csv": str(csv), "shards": pattern}


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    import io
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_model(root: Path, config: dict) -> dict:
    """The same config as bigbatch's JSON path and the peer's local-dir."""
    local = root / "model"
    local.mkdir(parents=True, exist_ok=True)
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    path = root / "bench-e2e-model.json"
    path.write_text(json.dumps(config))
    return {"bigbatch": str(path), "peer": f"local-dir:{local}"}


# --------------------------------------------------------------------------- runs

def command(contender: str, config: dict, args, data: dict, model: dict, logs: Path, name: str) -> list[str]:
    shared = ["--batch-size", str(config["batch"]), "--accum-freq", str(config["accum"]),
              "--workers", str(config["workers"]), "--epochs", str(args.epochs), "--precision", args.precision,
              "--lr", "5e-4", "--warmup", "10", "--wd", "0.1", "--seed", "0", "--log-every-n-steps", "10",
              "--save-frequency", "1", "--logs", str(logs), "--name", name]
    csv = ["--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--csv-separator", "\t"]
    if contender == PEER:
        return ["-m", "open_clip_train.main", "--model", model["peer"], "--train-data", data["csv"],
                "--device", args.device, *csv, *shared]
    train_data = ["--train-data", data["csv"], *csv] if contender == CSV else \
        ["--train-data", data["shards"], "--dataset-type", "webdataset"]
    return ["-m", "bigbatch", "train", "--model", model["bigbatch"], "--device", args.device,
            *train_data, *shared]


def run_once(contender: str, config: dict, args, data: dict, model: dict, work: Path, tag: str,
             profile: bool = False) -> dict:
    """One whole run; its wall time, start-up, training phase, data wait, end and exit status."""
    record = work / f"{tag}.json"
    record.unlink(missing_ok=True)  # a --work folder used before: each run starts afresh
    shutil.rmtree(work / "logs" / tag, ignore_errors=True)
    argv = command(contender, config, args, data, model, work / "logs", tag)
    env = dict(os.environ)
    if contender != PEER and args.bigbatch_src:
        env["PYTHONPATH"] = args.bigbatch_src
    mode = "--child-profile" if profile else "--child"
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, str(record), *argv],
                          env=env, cwd=work, capture_output=True, text=True)
    end = time.perf_counter()
    (work / f"{tag}.log").write_text(done.stdout + done.stderr)
    # CPU seconds of the process and its loader workers: less sensitive than wall time to
    # other people's load on a shared machine
    result = {"wall_s": end - start, "cpu_s": _children_cpu_seconds() - cpu_before,
              "returncode": done.returncode}
    if done.returncode != 0 or not record.is_file():
        result["error"] = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return result
    marks = json.loads(record.read_text())
    if marks["last_step"] is None:  # the peer ends some errors with status 0
        result["error"] = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no training step"]
        return result
    phase = marks["last_step"] - marks["first_batch"]
    result.update(startup_s=marks["first_batch"] - start, train_s=phase, end_s=end - marks["last_step"],
                  samples_per_s=args.epochs * args.samples / phase,
                  data_share=marks["data_seconds"] / phase, data_s=marks["data_seconds"],
                  steps=marks["steps"], batches=marks["batches"], max_rss_mib=marks["max_rss_mib"])
    if profile:
        result["phases"] = phase_table(marks, start, end)
    return result


def _children_cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants included
    return usage.ru_utime + usage.ru_stime


def phase_table(marks: dict, start: float, end: float) -> dict:
    """Seconds of a profiled bigbatch run by phase; they add up to its wall time."""
    measured = dict(marks["phases"])
    called = measured.pop("train() called")
    startup = [k for k in measured if k.startswith("startup")]
    rows = {"startup: interpreter, imports, CLI": called - start}
    rows.update({k: measured[k] for k in startup})
    rows["startup: run folder, loader start, rest"] = (marks["first_batch"] - called
                                                       - sum(measured[k] for k in startup))
    rows["data wait"] = marks["data_seconds"]
    for k in ("pass 1", "loss", "pass 2", "optimizer", "logging", "checkpoint", "plot"):
        rows[k] = measured.get(k, 0.0)
    rows["other (step bookkeeping, epoch ends, exit)"] = end - start - sum(rows.values())
    rows["of the wall: after the last step (checkpoint, plot, exit)"] = end - marks["last_step"]
    if "plot, in a thread" in measured:
        rows["beside the main thread: plot, in a thread"] = measured["plot, in a thread"]
    return rows


def parse_configs(text: str) -> list[dict]:
    configs = []
    for item in text.split(","):
        batch, accum, workers = (int(x) for x in item.lower().split("x"))
        configs.append({"name": f"b{batch}x{accum} w{workers}", "batch": batch, "accum": accum,
                        "workers": workers})
    return configs


def run(args, log=print) -> dict:
    contenders = [c.strip() for c in args.contenders.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-e2e-"))
    config_json = json.loads(Path(args.model_config).read_text()) if args.model_config else DEFAULT_MODEL
    data = write_data(work / "data", args.samples, args.image_size)
    model = write_model(work, config_json)
    result = {"environment": environment(args), "samples": args.samples, "epochs": args.epochs,
              "precision": args.precision,
              "model_config": config_json, "work": str(work), "configs": {}}
    for config in parse_configs(args.configs):
        runs = {c: [] for c in contenders}
        result["configs"][config["name"]] = entry = {"flags": config, "runs": runs}
        if args.profile:  # first: the tables below are rewritten after every run
            tag = f"{config['name'].replace(' ', '-')}-profile"
            entry["profile"] = run_once(CSV, config, args, data, model, work, tag, profile=True)
            log(f"{config['name']} profiled bigbatch csv: " + summary_line(entry["profile"]))
        for round_ in range(args.pairs):
            order = contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]
            for contender in order:
                tag = f"{config['name'].replace(' ', '-')}-{contender.replace(' ', '-')}-{round_}"
                runs[contender].append(run_once(contender, config, args, data, model, work, tag))
                log(f"{config['name']} round {round_ + 1}/{args.pairs} {contender}: "
                    + summary_line(runs[contender][-1]))
                entry["summary"] = summarize(runs)
                result["environment"]["load_average_end"] = os.getloadavg()
                write_outputs(result, Path(args.out), args.device)  # a stopped bench keeps its runs
    log(markdown(result))
    return result


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"failed ({r['returncode']}): {r['error']}"
    return (f"wall {r['wall_s']:.1f} s, train {r['samples_per_s']:.1f} samples/s, "
            f"data {100 * r['data_share']:.0f}%")


def summarize(runs: dict) -> dict:
    """Medians and ranges per contender; wall time as a ratio to the peer's, paired by round."""
    summary = {}
    peer = runs.get(PEER, [])
    for contender, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        row = {"runs_ok": len(ok), "runs": len(rs)}
        for key in ("wall_s", "cpu_s", "startup_s", "train_s", "end_s", "samples_per_s", "data_s",
                    "data_share", "max_rss_mib"):
            values = [r[key] for r in ok]
            if values:
                row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        ratios = [r["wall_s"] / p["wall_s"] for r, p in zip(rs, peer)
                  if "error" not in r and "error" not in p]
        if ratios and contender != PEER:
            row["wall_ratio_to_peer"] = {"median": statistics.median(ratios), "min": min(ratios),
                                         "max": max(ratios)}
        summary[contender] = row
    return summary


def environment(args) -> dict:
    import torch
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": args.device,
            "device_name": device_name, "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg(),
            "git": _git_head()}


def _git_head() -> str | None:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


# --------------------------------------------------------------------------- outputs

def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# End to end: bigbatch vs open_clip_train ({env['device']}, {env['date']})", "",
             f"{env['device_name']}, {env['cpus']} CPUs, torch {env['torch']}, git {env['git']}; "
             f"load average {env['load_average_start'][0]:.2f} at start, "
             f"{env.get('load_average_end', [float('nan')])[0]:.2f} at end. {result['samples']} "
             f"images (PNG/JPEG), {result['epochs']} epochs, {result.get('precision', 'fp32')}. Medians "
             "[min-max] over the rounds. Data wait: seconds the trainer waited for a batch, and their "
             "share of its training phase.", "",
             "| config | contender | wall s | wall / peer | CPU s | start-up s | train samples/s | data wait s "
             "| data wait | after last step s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key, fmt="{:.1f}", scale=1.0):
        v = row.get(key)
        if not v:
            return "-"
        return f"{fmt.format(v['median'] * scale)} [{fmt.format(v['min'] * scale)}-{fmt.format(v['max'] * scale)}]"

    for name, config in result["configs"].items():
        for contender, row in config.get("summary", {}).items():
            failed = "" if row["runs_ok"] == row["runs"] else f" ({row['runs'] - row['runs_ok']} failed)"
            lines.append(f"| {name} | {contender}{failed} | {cell(row, 'wall_s')} | "
                         f"{cell(row, 'wall_ratio_to_peer', '{:.2f}')} | {cell(row, 'cpu_s')} | "
                         f"{cell(row, 'startup_s')} | {cell(row, 'samples_per_s')} | {cell(row, 'data_s', '{:.2f}')} | "
                         f"{cell(row, 'data_share', '{:.0f}%', 100)} | {cell(row, 'end_s')} | "
                         f"{cell(row, 'max_rss_mib', '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def profile_markdown(result: dict) -> str:
    env = result["environment"]
    profiled = {n: c["profile"] for n, c in result["configs"].items() if "phases" in c.get("profile", {})}
    lines = [f"# Where a bigbatch run's time goes ({env['device']}, {env['date']})", "",
             f"One profiled `bigbatch train` run per configuration ({result['samples']} PNG/JPEG "
             f"images, CSV, {result['epochs']} epochs, {result.get('precision', 'fp32')}; {env['device_name']}, {env['cpus']} "
             f"CPUs, shared machine, git {env['git']}). Seconds and share of the process's wall "
             "time; the timers themselves add a little.", "",
             "| phase | " + " | ".join(profiled) + " |", "|---|" + "---|" * len(profiled)]
    phases = next(iter(profiled.values()))["phases"] if profiled else {}
    for phase in phases:
        cells = [f"{p['phases'][phase]:.2f} s ({100 * p['phases'][phase] / p['wall_s']:.0f}%)"
                 for p in profiled.values()]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| **wall** | " + " | ".join(f"{p['wall_s']:.2f} s" for p in profiled.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [name for name, c in result["configs"].items() if c.get("summary")]
    contenders = list(result["configs"][configs[0]]["summary"]) if configs else []
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(contenders))
    for i, contender in enumerate(contenders):
        rows = [result["configs"][c]["summary"][contender].get("wall_s") for c in configs]
        med = [r["median"] if r else 0 for r in rows]
        err = [[m - r["min"] if r else 0 for m, r in zip(med, rows)],
               [r["max"] - m if r else 0 for m, r in zip(med, rows)]]
        ax.bar([x + i * width for x in range(len(configs))], med, width, yerr=err, capsize=3, label=contender)
    ax.set_xticks([x + width * (len(contenders) - 1) / 2 for x in range(len(configs))], configs)
    ax.set_ylabel("process wall time, s (median, range)")
    ax.set_title(f"whole runs, {result['environment']['device']}, {result['environment']['date'][:10]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out: Path, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"e2e-{device.split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result, stem.with_suffix(".png"))
    if any("phases" in c.get("profile", {}) for c in result["configs"].values()):
        (out / f"e2e-profile-{device.split(':')[0]}.md").write_text(profile_markdown(result))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--child"], ["--child-profile"]):  # launcher: --child RECORD.json -m MODULE ARGS...
        run_child(argv[1], argv[2:], profile=argv[0] == "--child-profile")
        return 0
    args = parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        for config in result["configs"].values():
            config["summary"] = summarize(config["runs"])
        write_outputs(result, Path(args.out), result["environment"]["device"])
        print(markdown(result))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
