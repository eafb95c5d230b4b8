#!/usr/bin/env python
"""Benchmark bigbatch's feature-cached accumulation against a plain step and open_clip_train's.

Side by side in one process, on one model (the same initial weights), one set of
synthetic batches (random images and token ids, made once) and one set of flags:

  plain            bigbatch at batch K*b: `cached_backward(model, [whole], ClipLoss())`,
                   i.e. K = 1, one forward + one backward; then the AdamW step.
  bigbatch accum   bigbatch at b x K: `cached_backward(model, K micro-batches, ClipLoss())`;
                   then the AdamW step.
  open_clip accum  the peer at b x K: `open_clip_train.train.train_one_epoch` itself, fed
                   one step's K micro-batches from an in-memory loader, with its own
                   `open_clip.ClipLoss` and optimizer step.

How it is measured (DESIGN.md section 6; no time is ever asserted):

1. Time. Steps are interleaved, one of each configuration per round and the order
   rotated every round (ABC, BCA, CAB, ...), so a change in machine load hits all of them
   alike. The first --warmup-steps rounds are dropped. Reported: the median samples/s,
   and each configuration's ratio to plain taken round by round (paired) and its median.
2. Memory, in one extra untimed step per configuration:
   - everywhere, the peak bytes saved for backward: `saved_tensors_hooks` box every
     saved tensor; a storage is counted once however many boxes hold it, and a weakref
     finalizer on each box takes it off when autograd frees the box. Storages that
     existed before the step (weights, optimizer state, inputs) are not counted.
   - on CPU, also the peak live bytes of every tensor created during the step (a
     TorchDispatchMode sees each op's outputs; a weakref finalizer sees them die): the
     CPU analogue of the GPU's allocator peak, temporaries included.
   - on CUDA, `torch.cuda.max_memory_allocated()` over the step, less what was allocated
     before it, plus this configuration's own weights and optimizer state: what a run of
     this configuration alone would show (the other configurations' copies excluded).
3. The loss working set at N = 4k ... 64k (256k on CUDA), D = 512: measured where it fits
   (CPU: up to --loss-measure-max), the rest analytic or extrapolated, marked as such.
4. On CUDA only: the largest global batch that completes one step (doubling search).

Usage:
  python scripts/bench.py                 # CPU defaults: bigbatch-small, b=8, K=4, fp32, 2 threads
  python scripts/bench.py --device cuda --model ViT-B-32 --batch-size 256 --accum-freq 8 --precision amp
Writes bench/bench-<device>-<model>.{json,md,png} and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bigbatch import losses as bb_losses
from bigbatch.accumulation import cached_backward
from bigbatch.device import autocast_factory
from bigbatch.memory import MemoryMeter, storage_keys, tensor_bytes
from bigbatch.model import create_model, parameter_groups
from bigbatch.build import adamw  # the trainer's own optimizer and step
from bigbatch.step import optimizer_step, unscale_and_clip

MiB = 2**20
PLAIN, ACCUM, PEER = "bigbatch plain", "bigbatch accumulated", "open_clip_train accumulated"
CPU_LOSS_SIZES = [4096, 8192, 16384, 32768, 65536]
CUDA_LOSS_SIZES = CPU_LOSS_SIZES + [131072, 262144]


# --------------------------------------------------------------------------- options

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="bigbatch accumulated vs plain vs open_clip_train accumulated, side by side "
                    "(samples/s, peak memory), plus the loss working set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bigbatch-small", help="open_clip model name or bigbatch config")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size b")
    p.add_argument("--accum-freq", type=int, default=4, help="micro-batches per step K")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (one step of each configuration each)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed rounds first")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16"])
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench", help="folder for the JSON, markdown and PNG")
    p.add_argument("--skip-peer", action="store_true", help="do not run open_clip_train")
    p.add_argument("--skip-memory", action="store_true", help="no memory step per configuration")
    p.add_argument("--loss-sizes", default=None,
                   help="comma-separated N for the loss working set ('' to skip); default "
                        f"{','.join(map(str, CPU_LOSS_SIZES))} (+131072,262144 on CUDA)")
    p.add_argument("--loss-dim", type=int, default=512, help="feature dimension D of the loss study")
    p.add_argument("--loss-tile", type=int, default=None,
                   help="tile size for the tiled loss (default: ClipLoss's own default, else 1024)")
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
    p.add_argument("--quiet-load", type=float, default=1.5)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.precision == "amp" and device.type != "cuda":
        raise SystemExit("--precision amp (float16) needs CUDA: on CPU use fp32 or amp_bf16")
    if min(args.batch_size, args.accum_freq, args.steps) < 1 or args.warmup_steps < 0:
        raise SystemExit("--batch-size, --accum-freq and --steps must be >= 1, --warmup-steps >= 0")
    if args.loss_sizes is None:
        args.loss_sizes = CUDA_LOSS_SIZES if device.type == "cuda" else CPU_LOSS_SIZES
    else:
        args.loss_sizes = [int(s) for s in args.loss_sizes.split(",") if s.strip()]
    if args.loss_measure_max is None:
        args.loss_measure_max = 2**62 if device.type == "cuda" else 8192
    return args


# --------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def short_device(device: torch.device) -> str:
    return device.type  # file names: bench-cpu-<model>, bench-cuda-<model>


def versions() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "open_clip_torch": version("open_clip_torch"), "bigbatch": version("bigbatch"),
            "bigbatch_commit": commit, "cuda": torch.version.cuda}


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def wait_for_quiet(max_seconds: float, threshold: float) -> dict:
    """Poll the 1-minute load average until it is below `threshold` or time runs out."""
    start = time.monotonic()
    load = load_average()
    while load and load[0] >= threshold and time.monotonic() - start < max_seconds:
        time.sleep(min(15.0, max_seconds))
        load = load_average()
    return {"waited_s": round(time.monotonic() - start, 1), "load_at_start": load,
            "quiet": bool(load and load[0] < threshold)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data and setups

def make_batches(count: int, global_batch: int, image_size: tuple[int, int], context_length: int,
                 vocab_size: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` global batches of random uint8 images (N, 3, H, W) and token ids (N, L), made
    once: what bigbatch's loader yields (the model normalises them; the peer gets floats)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (global_batch, 3, *image_size), dtype=torch.uint8, generator=g)
        texts = torch.randint(1, vocab_size, (global_batch, context_length), generator=g)
        batches.append((images.to(device), texts.to(device)))
    return batches


def model_shapes(model: torch.nn.Module) -> tuple[tuple[int, int], int, int]:
    size = getattr(model.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return size, int(getattr(model, "context_length", 77)), int(getattr(model, "vocab_size", 49408))


@dataclass
class Setup:
    """One configuration: its own model copy and optimizer, and a step over global batch i."""
    name: str
    batch_label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]
    extra: dict = field(default_factory=dict)


def bigbatch_setup(name: str, model, args, batches, micro: bool, loss_fn=None) -> Setup:
    device = torch.device(args.device)
    optimizer = adamw(parameter_groups(model, args.wd), lr=args.lr)  # the trainer's: fused
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    autocast = autocast_factory(args.precision, device)
    loss_fn = loss_fn or bb_losses.ClipLoss()
    b, k = args.batch_size, args.accum_freq
    inputs = [list(zip(images.split(b), texts.split(b))) if micro else [(images, texts)]
              for images, texts in batches]

    def step(i: int) -> None:
        cached_backward(model, inputs[i % len(inputs)], loss_fn, autocast=autocast, grad_scaler=scaler)
        unscale_and_clip(model, optimizer, scaler, None)  # its norm: the non-finite check's
        optimizer_step(model, optimizer, scaler)

    label = f"{b} x {k}" if micro else f"{b * k}"
    return Setup(name, label, model, optimizer, step)


class _PeerLoader(list):
    """What train_one_epoch reads of a loader: iteration, num_batches, num_samples."""

    def __init__(self, micro_batches):
        super().__init__(micro_batches)
        self.num_batches = len(micro_batches)
        self.num_samples = sum(len(images) for images, _ in micro_batches)


class _PeerData:
    def __init__(self, loader: _PeerLoader):
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        pass


def peer_args(args) -> types.SimpleNamespace:
    """The fields open_clip_train.train.train_one_epoch reads (open_clip_torch 3.x)."""
    return types.SimpleNamespace(
        device=args.device, precision=args.precision, accum_freq=args.accum_freq,
        batch_size=args.batch_size, distill=False, skip_scheduler=True, horovod=False,
        grad_clip_norm=None, log_every_n_steps=10**9, world_size=1, rank=0, local_rank=0,
        wandb=False, distributed=False)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """What open_clip_train's loader yields: float32 images, normalised (CLIP's mean and std)."""
    return images.float().div(255).sub(0.45).div(0.27)


def peer_setup(model, args, batches) -> Setup:
    """open_clip_train's own train_one_epoch and ClipLoss; one call = one optimizer step."""
    import open_clip
    from open_clip_train.train import train_one_epoch  # needs pandas (its data.py imports it)

    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    loss = open_clip.ClipLoss(cache_labels=True)
    b = args.batch_size
    data = [{"train": _PeerData(_PeerLoader(list(zip(as_float(images).split(b), texts.split(b)))))}
            for images, texts in batches]
    pargs = peer_args(args)
    epoch = [0]

    def step(i: int) -> None:
        train_one_epoch(model, data[i % len(data)], loss, epoch[0], optimizer, scaler,
                        None, None, pargs)
        epoch[0] += 1
        # The peer zeroes at the start of its next step; zero now so that no configuration
        # carries gradients into another's measurements.
        optimizer.zero_grad(set_to_none=True)

    return Setup(PEER, f"{b} x {args.accum_freq}", model, optimizer, step,
                 extra={"call": "open_clip_train.train.train_one_epoch(model, data, open_clip.ClipLoss("
                                "cache_labels=True), epoch, AdamW, scaler, scheduler=None, dist_model=None, "
                                "args) with data['train'].dataloader = K in-memory micro-batches",
                        "args": vars(pargs)})


# --------------------------------------------------------------------------- measuring

def time_interleaved(setups: list[Setup], rounds: int, warmup: int, device: torch.device,
                     log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Seconds per step of each setup, rounds interleaved with a rotating order."""
    times: dict[str, list[float]] = {s.name: [] for s in setups}
    for r in range(warmup + rounds):
        order = setups[r % len(setups):] + setups[:r % len(setups)]
        for setup in order:
            if setup.extra.get("error"):
                continue
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            try:
                setup.step(r)
            except torch.OutOfMemoryError:  # it fit alone, not beside the others' copies
                setup.extra["error"] = "out of memory beside the other configurations"
                log(f"  {setup.name}: {setup.extra['error']}")
                setup.model = setup.optimizer = setup.step = None
                _free_cuda()
                continue
            synchronize(device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[setup.name].append(elapsed)
        if r == warmup - 1 or (r >= warmup and (r - warmup + 1) % max(1, rounds // 5) == 0):
            done = "warm-up done" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            log(f"  {done}: " + ", ".join(f"{s.name} {times[s.name][-1]:.3f}s" if times[s.name] else s.name
                                          for s in setups) + f"  load {load_average()}")
    return times


def measure_memory(setup: Setup, batches, device: torch.device, round_index: int) -> dict:
    """One untimed step under the meters (and the CUDA allocator's peak)."""
    gc.collect()
    exclude = storage_keys(setup.model, setup.optimizer, batches)
    result: dict = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    before_step: dict = {}

    def mark(*_):  # the peak of the forward/backward phase, before the optimizer's temporaries
        before_step.update(saved=meter.saved.peak, live=meter.live.peak)
        if device.type == "cuda":
            before_step["cuda"] = torch.cuda.max_memory_allocated(device) - before
    handle = setup.optimizer.register_step_pre_hook(mark)
    try:
        with MemoryMeter(exclude, track_live=device.type != "cuda") as meter:
            setup.step(round_index)
        synchronize(device)
    finally:
        handle.remove()
    result.update(meter.result())
    if device.type != "cuda" and "live" in before_step:
        result["live_peak_before_optimizer_step_bytes"] = before_step["live"]
    if device.type == "cuda":
        step_peak = torch.cuda.max_memory_allocated(device) - before
        resident = tensor_bytes(setup.model, setup.optimizer)
        result.update(cuda_step_peak_bytes=step_peak, cuda_resident_bytes=resident,
                      cuda_peak_bytes=step_peak + resident)
        if "cuda" in before_step:
            result["cuda_peak_before_optimizer_step_bytes"] = before_step["cuda"] + resident
    return result


def summarize(times: dict[str, list[float]], global_batch: int) -> dict[str, dict]:
    summary = {}
    plain = times.get(PLAIN)
    for name, seconds in times.items():
        rates = [global_batch / t for t in seconds]
        entry = {"seconds_per_step": [round(t, 5) for t in seconds],
                 "samples_per_s": [round(r, 3) for r in rates],
                 "median_seconds_per_step": statistics.median(seconds),
                 "median_samples_per_s": statistics.median(rates)}
        if plain:
            paired = [p / t for p, t in zip(plain, seconds)]  # time of plain / time of this
            entry["ratio_to_plain_paired"] = [round(x, 4) for x in paired]
            entry["ratio_to_plain"] = statistics.median(paired)
            entry["ratio_to_plain_q1_q3"] = _quartiles(paired)
        summary[name] = entry
    if ACCUM in times and PEER in times:
        paired = [p / a for a, p in zip(times[ACCUM], times[PEER])]
        summary[ACCUM]["speedup_vs_peer"] = statistics.median(paired)
        summary[ACCUM]["speedup_vs_peer_paired"] = [round(x, 4) for x in paired]
        summary[ACCUM]["speedup_vs_peer_q1_q3"] = _quartiles(paired)
    return summary


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 4), round(q[2], 4)]


# --------------------------------------------------------------------------- phases and profile

def phase_times(model, args, batches, repeats: int = 10) -> dict:
    """Medians of the pieces a step is made of, measured interleaved, to explain the ratios.

    f0(n): forward without grad; fb(n): forward + loss + backward into empty .grad;
    fbK: K x fb(b) accumulating into .grad (what both accumulations back-propagate);
    opt: the AdamW step + zero_grad, the trainer's fused one; peer_opt: torch's default
    AdamW, which open_clip_train builds. Predicted step seconds:
      plain = fb(K*b) + opt
      bigbatch = (K-1) f0(b) + fbK + opt   (its last micro-batch keeps its graph)
      open_clip_train = K f0(b) + fbK + peer_opt (+ K losses over N instead of 1)
    """
    device = torch.device(args.device)
    model = copy.deepcopy(model).train()
    optimizer = adamw(parameter_groups(model, args.wd), lr=args.lr)
    peer_optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr)
    images, texts = batches[0]
    b, k = args.batch_size, args.accum_freq
    n = b * k
    loss_fn = bb_losses.ClipLoss()
    autocast = autocast_factory(args.precision, device)

    def forward_nograd(size):
        with torch.no_grad(), autocast():
            model(images[:size], texts[:size])

    def forward_backward(size, times=1):
        for j in range(times):
            with autocast():
                loss = loss_fn(**model(images[j * size:(j + 1) * size], texts[j * size:(j + 1) * size]))
            loss.backward()

    def optimizer_only(opt):
        opt.step()
        opt.zero_grad(set_to_none=True)

    pieces = {"forward_nograd_micro_s": lambda: forward_nograd(b),
              "forward_backward_micro_s": lambda: forward_backward(b),
              "forward_backward_K_micro_accumulated_s": lambda: forward_backward(b, k),
              "forward_nograd_global_s": lambda: forward_nograd(n),
              "forward_backward_global_s": lambda: forward_backward(n),
              "optimizer_step_s": lambda: optimizer_only(optimizer),
              "optimizer_step_peer_s": lambda: optimizer_only(peer_optimizer)}
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for r in range(repeats + 1):
        for name, fn in pieces.items():
            if name.startswith("optimizer_step"):
                forward_backward(b)  # gradients to step on (untimed)
            else:
                optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if r:  # the first round warms up
                samples[name].append(time.perf_counter() - start)
    out = {name: statistics.median(v) for name, v in samples.items()}
    f0, fbk, opt = out["forward_nograd_micro_s"], out["forward_backward_K_micro_accumulated_s"], out["optimizer_step_s"]
    plain = out["forward_backward_global_s"] + opt
    out.update(predicted_plain_s=plain, predicted_accum_s=(k - 1) * f0 + fbk + opt,
               predicted_peer_s=k * f0 + fbk + out["optimizer_step_peer_s"])
    out.update(predicted_ratio_accum=plain / out["predicted_accum_s"],
               predicted_ratio_peer=plain / out["predicted_peer_s"],
               predicted_ratio_accum_without_recompute=plain / (fbk + opt),
               load_average=load_average())
    return out


def profile_steps(setups: list[Setup], out_path: Path, round_index: int) -> None:
    """One step of each setup under torch.profiler; the top ops by self time, as text."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sections = []
    for setup in setups:
        with profile(activities=activities) as prof:
            setup.step(round_index)
        table = None
        for sort in (["self_device_time_total", "self_cuda_time_total"] if torch.cuda.is_available()
                     else []) + ["self_cpu_time_total"]:
            with contextlib.suppress(Exception):
                table = prof.key_averages().table(sort_by=sort, row_limit=25)
                break
        sections.append(f"## {setup.name} ({setup.batch_label})\n{table}")
    out_path.write_text("\n\n".join(sections) + "\n")


# --------------------------------------------------------------------------- loss working set

def tiled_loss_support() -> dict:
    """What bigbatch offers today: tile_size on ClipLoss, loss_working_set_bytes, DEFAULT_TILE."""
    tiled_module = getattr(bb_losses, "tiled", None)
    params = inspect.signature(bb_losses.ClipLoss.__init__).parameters
    default_tile = params["tile_size"].default if "tile_size" in params else None
    if not isinstance(default_tile, int):
        default_tile = getattr(tiled_module, "DEFAULT_TILE", None)
    working_set_fn = (getattr(bb_losses, "loss_working_set_bytes", None)
                      or getattr(tiled_module, "loss_working_set_bytes", None))
    return {"tile_size": "tile_size" in params, "default_tile": default_tile,
            "working_set_fn": working_set_fn, "tiled_module": tiled_module}


@contextlib.contextmanager
def untiled_loss():
    """Force the plain (N, N) logits: ClipLoss(tile_size=None) tiles by itself above
    tiled.PLAIN_MAX_LOGITS, which would hide the quadratic working set being measured."""
    module = tiled_loss_support()["tiled_module"]
    if module is None or not hasattr(module, "PLAIN_MAX_LOGITS"):
        yield
        return
    saved = module.PLAIN_MAX_LOGITS
    module.PLAIN_MAX_LOGITS = float("inf")
    try:
        yield
    finally:
        module.PLAIN_MAX_LOGITS = saved


def loss_working_set(sizes: list[int], dim: int, tile: int | None, measure_max: int,
                     device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Peak bytes of one CLIP loss forward + backward over N x N, plain and tiled."""
    support = tiled_loss_support()
    tile = tile or support["default_tile"] or 1024
    working_set_fn = support["working_set_fn"]
    variants = ["plain"] + (["tiled"] if support["tile_size"] else [])
    rows = []
    for n in sizes:
        row: dict = {"N": n, "D": dim}
        for variant in variants:
            tiled = variant == "tiled"
            entry: dict = {}
            if working_set_fn is not None:
                with contextlib.suppress(Exception):
                    entry["analytic_bytes"] = int(working_set_fn(n, n, dim, tile, tiled))
            if n <= measure_max:
                try:
                    entry.update(_measure_loss(n, dim, tile if tiled else None, device))
                    entry["source"] = "measured"
                except torch.OutOfMemoryError:
                    entry["measure_error"] = "out of memory"
                    _free_cuda()
                except Exception as error:  # a loss in progress elsewhere must not stop the bench
                    entry["measure_error"] = f"{type(error).__name__}: {error}"
            if "source" not in entry:
                entry["source"] = "analytic" if "analytic_bytes" in entry else "not measured"
            row[variant] = entry
            shown = entry.get("measured_bytes", entry.get("analytic_bytes"))
            log(f"  loss N={n} {variant}: {_mib(shown)} MiB ({entry['source']}"
                + (f", analytic {_mib(entry['analytic_bytes'])}" if entry["source"] == "measured"
                   and "analytic_bytes" in entry else "")
                + (f", {entry['seconds']}s" if "seconds" in entry else "") + ")")
        rows.append(row)
    _extrapolate_plain(rows)
    return {"tile": tile if support["tile_size"] else None, "tiling_available": support["tile_size"],
            "working_set_fn_available": working_set_fn is not None, "rows": rows,
            "metric": ("measured_bytes: CUDA max_memory_allocated during the call over the baseline "
                       "(the input features)" if device.type == "cuda" else
                       "measured_bytes: CPU peak of all tensors made during the call (TorchDispatchMode), "
                       "feature gradients included; saved_plus_largest_bytes: peak saved-for-backward "
                       "bytes + the largest single temporary")
                      + "; analytic_bytes: loss_working_set_bytes(N, N, D, tile, tiled), which counts "
                        "the same things"}


def _measure_loss(n: int, dim: int, tile: int | None, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(n)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    loss_fn = bb_losses.ClipLoss(tile_size=tile) if tile else bb_losses.ClipLoss()
    exclude = storage_keys(images, texts, logit_scale)
    if device.type == "cuda":
        _free_cuda()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with (untiled_loss() if tile is None else contextlib.nullcontext()):
        with MemoryMeter(exclude, track_live=device.type != "cuda") as meter:
            loss = loss_fn(image_features=images, text_features=texts, logit_scale=logit_scale)
            loss.backward()
            del loss
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 3), **meter.result()}
    if device.type == "cuda":
        result["measured_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        result["measured_bytes"] = result["live_peak_bytes"]
        result["saved_plus_largest_bytes"] = result["saved_peak_bytes"] + result["largest_tensor_bytes"]
    del images, texts, logit_scale
    return result


def _extrapolate_plain(rows: list[dict]) -> None:
    """Without an analytic formula: the plain loss is N^2, scale the largest measured size."""
    measured = [r for r in rows if r["plain"].get("source") == "measured"]
    if not measured:
        return
    ref = max(measured, key=lambda r: r["N"])
    for row in rows:
        entry = row["plain"]
        if entry["source"] == "not measured":
            entry["extrapolated_bytes"] = int(ref["plain"]["measured_bytes"] * (row["N"] / ref["N"]) ** 2)
            entry["source"] = f"extrapolated (N^2 from N={ref['N']})"


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- largest batch (CUDA)

def largest_batch_search(model_fn: Callable[[], torch.nn.Module], args, log: Callable[[str], None] = print) -> dict:
    """Largest global batch completing one step, doubling from b (CUDA only).

    plain doubles its one batch; the accumulated setups keep the micro-batch b and double
    K, reusing one micro-batch of data K times (the loss sees N = b*K samples; the inputs
    of a huge K would live in host memory anyway, DESIGN.md section 1).
    """
    size, context, vocab = model_shapes(model_fn())
    support = tiled_loss_support()
    results = {}
    kinds = [PLAIN, ACCUM] + ([] if args.skip_peer else [PEER])
    for kind in kinds:
        trials, best, stop = [], None, f"reached --max-batch-cap {args.max_batch_cap}"
        n = args.batch_size
        while n <= args.max_batch_cap:
            _free_cuda()
            model = model_fn()
            try:
                seconds = _one_big_step(kind, model, n, size, context, vocab, args, support)
                trials.append({"global_batch": n, "seconds": round(seconds, 3)})
                best = n
                log(f"  {kind}: global batch {n} ok ({seconds:.1f}s)")
                timed = [t["seconds"] for t in trials if "seconds" in t]
                growth = max(2.0, timed[-1] / timed[-2]) if len(timed) > 1 and timed[-2] > 0 else 2.0
                if seconds * growth > args.max_batch_seconds:  # the peer's step grows ~ K * N^2
                    stop = (f"the next step would take about {seconds * growth:.0f}s, over "
                            f"--max-batch-seconds {args.max_batch_seconds}")
                    break
            except torch.OutOfMemoryError:
                trials.append({"global_batch": n, "error": "out of memory"})
                stop = f"out of memory at {n}"
                log(f"  {kind}: global batch {n} out of memory")
                break
            except Exception as error:
                trials.append({"global_batch": n, "error": f"{type(error).__name__}: {error}"})
                stop = f"{type(error).__name__} at {n}"
                break
            finally:
                del model
                _free_cuda()
            n *= 2
        results[kind] = {"largest_global_batch": best, "stopped": stop, "trials": trials}
    for kind in (PLAIN, ACCUM):
        results[kind]["loss"] = ("bigbatch ClipLoss() (tiles by itself above 8192^2 logits)"
                                 if support["tile_size"] else "bigbatch ClipLoss() (untiled)")
    return results


def _one_big_step(kind, model, n, size, context, vocab, args, support) -> float:
    device = torch.device(args.device)
    b = args.batch_size
    micro = n if kind == PLAIN else b
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (micro, 3, *size), dtype=torch.uint8, generator=g).to(device)
    texts = torch.randint(1, vocab, (micro, context), generator=g).to(device)
    search_args = copy.copy(args)
    search_args.accum_freq = n // micro
    synchronize(device)
    start = time.perf_counter()
    if kind == PEER:
        from open_clip_train.train import train_one_epoch
        import open_clip
        optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
        data = {"train": _PeerData(_PeerLoader([(as_float(images), texts)] * search_args.accum_freq))}
        train_one_epoch(model, data, open_clip.ClipLoss(), 0, optimizer, scaler, None, None,
                        peer_args(search_args))
    else:
        loss_fn = bb_losses.ClipLoss()
        setup = bigbatch_setup(kind, model, search_args, [(images, texts)], micro=False, loss_fn=loss_fn)
        micro_batches = [(images, texts)] * search_args.accum_freq
        scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
        cached_backward(model, micro_batches, loss_fn,
                        autocast=autocast_factory(args.precision, device), grad_scaler=scaler)
        unscale_and_clip(model, setup.optimizer, scaler, None)
        optimizer_step(model, setup.optimizer, scaler)
    synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- reports

def _mib(value) -> str:
    return "-" if value is None else f"{value / MiB:,.1f}"


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    b, k = cfg["batch_size"], cfg["accum_freq"]
    lines = [f"### bigbatch benchmark: {cfg['model']} on {env['device_name']}",
             "",
             f"{cfg['precision']}, micro-batch b={b}, K={k} (global batch {b * k}); "
             f"{cfg['steps']} timed rounds after {cfg['warmup_steps']} warm-up, interleaved; "
             f"{env['date']}; torch {env['versions']['torch']}, open_clip {env['versions']['open_clip_torch']}; "
             f"load average {env['load_average_start']} -> {env['load_average_end']}",
             ""]
    cuda = env["device"].startswith("cuda")
    if cuda:
        mem_cols = ["peak memory (MiB)", "peak before optimizer step (MiB)", "saved for backward (MiB)"]
        mem_keys = ["cuda_peak_bytes", "cuda_peak_before_optimizer_step_bytes", "saved_peak_bytes"]
    else:
        mem_cols = ["saved for backward (MiB)", "step tensors, fwd+bwd peak (MiB)", "step tensors, peak (MiB)"]
        mem_keys = ["saved_peak_bytes", "live_peak_before_optimizer_step_bytes", "live_peak_bytes"]
    lines += ["| configuration | batch | samples/s (median) | vs plain (paired median [q1, q3]) | "
              + " | ".join(mem_cols) + " |",
              "|---|---|---:|---:|" + "---:|" * len(mem_cols)]
    for name, row in result["configs"].items():
        if "error" in row:
            lines.append(f"| {name} | {row.get('batch', '')} | not run: {row['error']} | |"
                         + " |" * len(mem_cols))
            continue
        mem = row.get("memory", {})
        q = row.get("ratio_to_plain_q1_q3") or []
        ratio = _fmt(row.get("ratio_to_plain")) + (f" [{q[0]:.2f}, {q[1]:.2f}]" if len(q) == 2 else "")
        lines.append(f"| {name} | {row['batch']} | {row['median_samples_per_s']:.1f} | {ratio} | "
                     + " | ".join(_mib(mem.get(k)) for k in mem_keys) + " |")
    accum = result["configs"].get(ACCUM, {})
    if "speedup_vs_peer" in accum:
        q = accum["speedup_vs_peer_q1_q3"]
        lines += ["", f"bigbatch accumulated / open_clip_train accumulated, samples/s (paired median): "
                      f"{accum['speedup_vs_peer']:.2f} [q1 {q[0]:.2f}, q3 {q[1]:.2f}]"]
    lines += ["", "Memory: " + result.get("memory_method", "")]
    targets = result.get("targets", {})
    if targets:
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        for name, t in targets.items():
            met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {name} | {t['measured']} | {met} |")
    loss = result.get("loss_working_set")
    if loss and loss.get("rows"):
        variants = ["plain"] + (["tiled"] if loss["tiling_available"] else [])
        head = "| N |"
        for v in variants:
            name = v if v == "plain" else f"tiled, tile {loss['tile']}"
            head += f" {name}: measured (MiB) | {name}: analytic (MiB) |"
        lines += ["", f"Contrastive loss working set, one forward + backward, D={loss['rows'][0]['D']} "
                  f"({loss['metric']}):", "", head, "|---:|" + "---:|---:|" * len(variants)]
        for row in loss["rows"]:
            cells = [f"{row['N']:,}"]
            for v in variants:
                e = row[v]
                measured = _mib(e.get("measured_bytes"))
                if "measure_error" in e:
                    measured = f"failed: {e['measure_error']}"
                estimate = e.get("analytic_bytes")
                label = "analytic"
                if estimate is None and "extrapolated_bytes" in e:
                    estimate, label = e["extrapolated_bytes"], "extrapolated N^2"
                cells += [measured, f"{_mib(estimate)} ({label})" if estimate is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    search = result.get("largest_batch")
    if search:
        lines += ["", "Largest global batch completing one step (doubling from b):", "",
                  "| configuration | largest global batch | stopped because |", "|---|---:|---|"]
        for name, s in search.items():
            lines.append(f"| {name} | {s['largest_global_batch'] or '-'} | {s['stopped']} |")
    phases = result.get("phases")
    if phases:
        lines += ["", "Where the time goes (medians of separately timed pieces, seconds; `--profile`):", "",
                  "| forward no-grad, b | fwd+bwd, b | K x fwd+bwd, b, accumulating | fwd+bwd, K*b | "
                  "AdamW step: fused, ours | default, the peer's | "
                  "predicted vs plain: bigbatch | open_clip_train | without any recompute |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {phases['forward_nograd_micro_s']:.4f} | {phases['forward_backward_micro_s']:.4f} | "
                  f"{phases['forward_backward_K_micro_accumulated_s']:.4f} | {phases['forward_backward_global_s']:.4f} | "
                  f"{phases['optimizer_step_s']:.4f} | {phases['optimizer_step_peer_s']:.4f} | "
                  f"{phases['predicted_ratio_accum']:.2f} | "
                  f"{phases['predicted_ratio_peer']:.2f} | {phases['predicted_ratio_accum_without_recompute']:.2f} |"]
    return "\n".join(lines) + "\n"


def targets(configs: dict) -> dict:
    accum, peer = configs.get(ACCUM, {}), configs.get(PEER, {})
    ratio = accum.get("ratio_to_plain")
    speedup = accum.get("speedup_vs_peer")
    out = {"bigbatch accumulated / plain >= 0.78": {
        "measured": _fmt(ratio), "met": None if ratio is None else ratio >= 0.78}}
    out["bigbatch accumulated >= 1.15x open_clip_train accumulated (samples/s)"] = {
        "measured": _fmt(speedup), "met": None if speedup is None else speedup >= 1.15}
    keys = (["cuda_peak_bytes", "saved_peak_bytes"] if "cuda_peak_bytes" in accum.get("memory", {})
            else ["saved_peak_bytes", "live_peak_bytes"])
    for key in keys:
        mine, theirs = accum.get("memory", {}).get(key), peer.get("memory", {}).get(key)
        out[f"bigbatch peak memory <= open_clip_train's ({key})"] = {
            "measured": f"{_mib(mine)} vs {_mib(theirs)} MiB"
                        + (f" ({mine - theirs:+,} bytes)" if mine is not None and theirs is not None else ""),
            "met": None if mine is None or theirs is None else mine <= theirs}
    return out


def plot(result: dict, out_png: Path) -> Path:
    """Throughput ratio to plain, peak memory, and the loss working set, side by side."""
    from matplotlib.figure import Figure
    configs = {n: r for n, r in result["configs"].items() if "error" not in r}
    cuda = result["environment"]["device"].startswith("cuda")
    loss_rows = (result.get("loss_working_set") or {}).get("rows") or []
    fig = Figure(figsize=(15 if loss_rows else 10, 4.5), layout="constrained")
    axes = fig.subplots(1, 3 if loss_rows else 2)
    names = list(configs)
    labels = [n.replace(" accumulated", "\naccumulated").replace(" plain", "\nplain") for n in names]
    colors = ["tab:gray", "tab:blue", "tab:orange"][:len(names)]

    ratios = [configs[n].get("ratio_to_plain", math.nan) for n in names]
    bars = axes[0].bar(labels, ratios, color=colors)
    axes[0].bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=8)
    axes[0].axhline(0.78, color="tab:green", ls="--", lw=1, label="target 0.78")
    axes[0].set_ylabel("samples/s relative to plain (paired median)")
    axes[0].set_title("throughput")
    axes[0].legend(fontsize="small")

    mem_keys = ({"max_memory_allocated": "cuda_peak_bytes", "saved for backward": "saved_peak_bytes"} if cuda
                else {"saved for backward": "saved_peak_bytes",
                      "step tensors (fwd+bwd)": "live_peak_before_optimizer_step_bytes",
                      "step tensors (whole step)": "live_peak_bytes"})
    width = 0.8 / len(mem_keys)
    for i, (legend, key) in enumerate(mem_keys.items()):
        mems = [configs[n].get("memory", {}).get(key, math.nan) / MiB for n in names]
        xs = [j + (i - (len(mem_keys) - 1) / 2) * width for j in range(len(names))]
        bars = axes[1].bar(xs, mems, width, label=legend, alpha=1.0 - 0.25 * i, color=colors)
        axes[1].bar_label(bars, labels=[f"{m:.1f}" for m in mems], fontsize=7)
    axes[1].set_xticks(range(len(names)), labels)
    axes[1].set_ylabel("MiB")
    axes[1].set_title("peak memory, bars: " + " | ".join(mem_keys), fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)

    if loss_rows:
        ax = axes[2]
        for variant, color, marker in (("plain", "tab:red", "o"), ("tiled", "tab:blue", "x")):
            points = [(r["N"], r[variant]) for r in loss_rows if variant in r]
            measured = [(n, e["measured_bytes"] / MiB) for n, e in points if "measured_bytes" in e]
            estimated = [(n, e.get("analytic_bytes", e.get("extrapolated_bytes")) / MiB) for n, e in points
                         if e.get("analytic_bytes", e.get("extrapolated_bytes")) is not None]
            if estimated:
                ax.plot(*zip(*estimated), "--", color=color, alpha=0.6, label=f"{variant} (analytic/extrapolated)")
            if measured:
                ax.plot(*zip(*measured), marker=marker, markersize=8, color=color, label=f"{variant} (measured)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N")
        ax.set_ylabel("MiB")
        ax.set_title(f"contrastive loss working set (D={loss_rows[0]['D']})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")

    cfg = result["config"]
    fig.suptitle(f"{cfg['model']}, b={cfg['batch_size']} x K={cfg['accum_freq']}, {cfg['precision']} on "
                 f"{result['environment']['device_name']}", fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


# --------------------------------------------------------------------------- main

def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """The whole benchmark; returns the result dict (also written to args.out)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = wait_for_quiet(args.wait_quiet, args.quiet_load) if args.wait_quiet > 0 else None
    torch.manual_seed(args.seed)
    template = create_model(args.model, device=device).model
    size, context, vocab = model_shapes(template)
    b, k = args.batch_size, args.accum_freq
    global_batch = b * k
    batches = make_batches(2, global_batch, size, context, vocab, device, args.seed)

    env = {"device": str(device), "device_name": device_name(device), "versions": versions(),
           "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "load_average_start": load_average(), "hostname_cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "wait_for_quiet": quiet}
    config = {k_: v for k_, v in vars(args).items()}
    config.update(global_batch=global_batch, image_size=list(size), context_length=context,
                  n_parameters=sum(p.numel() for p in template.parameters()),
                  data="2 global batches of random uint8 images and random token ids, made once, "
                       "alternating by round; the same for every configuration (open_clip_train "
                       "gets them as normalised float32, as its loader gives them)")
    log(f"bench: {args.model} ({config['n_parameters'] / 1e6:.1f} M params) on {env['device_name']}, "
        f"{args.precision}, b={b} x K={k}; load {env['load_average_start']}")

    configs: dict[str, dict] = {}
    setups = []
    makers = [(PLAIN, f"{global_batch}", lambda: bigbatch_setup(PLAIN, copy.deepcopy(template), args, batches, micro=False)),
              (ACCUM, f"{b} x {k}", lambda: bigbatch_setup(ACCUM, copy.deepcopy(template), args, batches, micro=True))]
    if not args.skip_peer:
        makers.append((PEER, f"{b} x {k}", lambda: peer_setup(copy.deepcopy(template), args, batches)))
    else:
        configs[PEER] = {"batch": f"{b} x {k}", "error": "skipped (--skip-peer)"}
    for name, label, make in makers:
        try:  # fail here, not in the middle of the timing: the peer may not run, a batch not fit
            setup = make()
            setup.step(0)
            setups.append(setup)
        except Exception as error:
            oom = isinstance(error, torch.OutOfMemoryError)
            reason = "out of memory" if oom else f"{type(error).__name__}: {error}"
            log(f"  {name} cannot run here: {reason}")
            configs[name] = {"batch": label, "error": reason,
                             **({} if oom else {"traceback": traceback.format_exc(limit=5)})}
        setup = None
        _free_cuda()  # what a failed configuration allocated

    log(f"timing {args.warmup_steps} warm-up + {args.steps} rounds of {', '.join(s.name for s in setups)}")
    times = time_interleaved(setups, args.steps, args.warmup_steps, device, log)
    for failed in [s for s in setups if s.extra.get("error")]:
        configs[failed.name] = {"batch": failed.batch_label, **failed.extra}
    setups = [s for s in setups if not s.extra.get("error")]
    times = {s.name: times[s.name] for s in setups}
    summary = summarize(times, global_batch)
    for setup in setups:
        configs[setup.name] = {"batch": setup.batch_label, **summary[setup.name], **setup.extra}
    configs = {name: configs[name] for name in (PLAIN, ACCUM, PEER) if name in configs}

    if not args.skip_memory:
        log("memory: one untimed step of each configuration under the meters")
        for setup in setups:
            configs[setup.name]["memory"] = measure_memory(setup, batches, device, args.warmup_steps + args.steps)
            m = configs[setup.name]["memory"]
            log(f"  {setup.name}: saved for backward {_mib(m['saved_peak_bytes'])} MiB"
                + (f", step tensors {_mib(m['live_peak_bytes'])} MiB" if "live_peak_bytes" in m else "")
                + (f", CUDA peak {_mib(m['cuda_peak_bytes'])} MiB" if "cuda_peak_bytes" in m else ""))

    result = {"config": config, "environment": env, "configs": configs,
              "memory_method": ("saved_peak_bytes: peak over the step of the bytes autograd saved for "
                                "backward (saved_tensors_hooks; each storage once; freed via weakref "
                                "finalizers; weights/optimizer state/inputs excluded). live_peak_bytes (CPU): "
                                "peak of all tensors created in the step (TorchDispatchMode), temporaries, "
                                "gradients and cached features included. cuda_peak_bytes: "
                                "max_memory_allocated over the step minus the baseline, plus this "
                                "configuration's weights and optimizer state."),
              "timing_method": ("each round runs one step of every configuration in a rotating order; "
                                "ratio_to_plain is the median over rounds of t_plain / t_config of the "
                                "same round; samples/s = global batch / step seconds")}
    if args.profile:
        log("phases and profile")
        result["phases"] = phase_times(template, args, batches)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"profile-{short_device(device)}-{Path(args.model).stem}-b{args.batch_size}x{args.accum_freq}.txt"
        profile_steps(setups, out / name, 0)
    del setups
    _free_cuda()

    if args.loss_sizes:
        log(f"loss working set at N = {args.loss_sizes}, D = {args.loss_dim}")
        result["loss_working_set"] = loss_working_set(args.loss_sizes, args.loss_dim, args.loss_tile,
                                                      args.loss_measure_max, device, log)
    if device.type == "cuda" and not args.skip_max_batch:
        log("largest global batch (doubling)")

        def fresh_model():
            torch.manual_seed(args.seed)
            return create_model(args.model, device=device).model
        result["largest_batch"] = largest_batch_search(fresh_model, args, log)

    env["load_average_end"] = load_average()
    result["targets"] = targets(configs)
    write_outputs(result, Path(args.out))
    return result


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    config = result["config"]
    device = short_device(torch.device(result["environment"]["device"]))
    stem = f"bench-{device}-{Path(config['model']).stem}-b{config['batch_size']}x{config['accum_freq']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print()
    print(markdown(result))
    print(f"written to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
