#!/usr/bin/env python
"""The one GPU check: the figures bigbatch claims for a GPU, measured in one short run.

    bash scripts/gpu_check.sh OUT_DIR            # one H100/H200, at most 8 minutes (--total)
    bash scripts/gpu_check.sh OUT_DIR --smoke    # CPU, a tiny model, about a minute

Each part runs in a process of its own under its own time budget, and writes its JSON
after every measurement: a part that fails, runs out of memory in a way it did not
expect, or runs out of time leaves what it had measured, and the other parts still run.
The timed parts (a) have the device to themselves (env, bench and peer_largest first,
patchify and e2e after the shared ones: under --total the targets come first); the others
(s) run side by side, in
groups whose peaks fit the card, so that their host work hides under each other's kernels
(scripts/gpu_schedule.py; --serial: one after the other, give it --total 900). At --total
seconds (480) what still runs is stopped with what it has, and the summary says so.

  env          (a) the device and the versions
  tests        (s) `pytest -m cuda`: the engine's exactness on CUDA (bf16 autocast, fp16
               scaling, dropout), fused attention kernels, pinned offload, a one-GPU DDP step
  bench        (a) bigbatch plain (the global batch in one pass, and the same micro-batch
               without accumulation) / accumulated / open_clip_train accumulated, side by side
               (samples/s, max_memory_allocated): ViT-B-32, bf16, micro-batch 256 x K = 4, 16
  plan         (s) `bigbatch plan`'s predicted peak (meta estimate and CUDA probe) against the
               peak measured over a real training step, for five configurations
  capped       (s) ViT-L-14 at a global batch of 32,768 under a 24 GiB cap
               (`torch.cuda.set_per_process_memory_fraction`), micro-batch from the planner
  largest      (s) the largest global batch one step completes for ViT-B-32 (doubling from
               524,288; inputs offloaded)
  peer_largest (a) where open_clip_train's accumulation runs out of memory on the same work
  compile      (s, timed alone) `--torchcompile`'s speed-up: the accumulated step of ViT-B-32
               (256 x 4) eager and compiled with inductor, side by side (--smoke: an eager
               capture, no speed)
  patchify     (a) ViT-B-32's patch embedding, forward + backward in bf16 at micro-batch and
               global batch: cuDNN's convolution (benchmark on, as open_clip_train runs it)
               against the matrix product bigbatch runs on CUDA (bigbatch.patch_embedding)
  compile_ratio (a, not by default: --parts compile_ratio) accumulated/plain under
               `--torchcompile`: the 256 x 4 step and the same 1,024 samples as one micro-batch,
               eager and compiled, side by side (three compiles: about 3 minutes on an H200)
  e2e          (a, not by default: --parts e2e) whole CLI runs of bigbatch (CSV, shards) and
               open_clip_train on the same PNG/JPEG files, model and flags
               (scripts/bench_e2e.py): ViT-B-32, bf16, 128 x 4, 8 workers

Writes OUT_DIR/gpu-check.{json,md,png} (plus the benchmark's own files) and prints the
summary. --smoke runs every line on CPU with a tiny model: the test suite does so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import gpu_schedule  # beside this file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "assets" / "test-clip.json")
GiB = 1024 ** 3
PARTS = ("env", "tests", "bench", "plan", "capped", "largest", "peer_largest", "compile", "patchify",
         "compile_ratio", "e2e")
# minutes more each, beyond the list: asked for by name (--parts e2e,compile_ratio)
DEFAULT_PARTS = tuple(p for p in PARTS if p not in ("compile_ratio", "e2e"))
# timed (or searching where the card's memory ends): the device to themselves; the others
# may share it (scripts/gpu_schedule.py)
ALONE = {"env", "bench", "patchify", "peer_largest", "compile_ratio", "e2e"}
# before the shared parts: env tells the card's memory, bench has two targets, peer_largest one;
# after them patchify (not a target) and e2e, cut first by --total
FIRST = ("env", "bench", "peer_largest")
BIGBATCH_OFFLOADED = "bigbatch accumulated, inputs offloaded"
PEER = "open_clip_train accumulated"


# --------------------------------------------------------------------------- settings

def settings(smoke: bool) -> dict:
    """Everything a part needs to know; --smoke shrinks models, batches and budgets.
    peaks: GiB each shared part may take at most, for packing them beside each other
    (on the H200: tests 2, plan 23, capped under its 24 cap, largest 39, compile 11);
    device_gib (smoke): the memory the packing assumes, small enough to make two groups."""
    if smoke:
        return dict(device="cpu", precision="fp32", bench_model=TINY, bench_batch=4, bench_ks=[2],
                    bench_steps=1, plan_configs=[(TINY, 4, 2, False, False), (TINY, 4, 3, True, True)],
                    largest_model=TINY, largest_micro=8, largest_start={PEER: 16, BIGBATCH_OFFLOADED: 16},
                    largest_cap=32,
                    capped_model=TINY, capped_global=64, capped_gib=1.0,
                    compile_model=TINY, compile_batch=4, compile_k=2, compile_backend="eager",
                    e2e=dict(model=TINY, configs="4x2x1", samples=16, image_size=16, epochs=1),
                    patchify=dict(model=TINY, batches=[4, 8], repeats=2),
                    peaks=dict(tests=0.1, plan=0.3, capped=0.3, largest=0.5, compile=0.2), device_gib=1.0,
                    budgets=dict(env=60, tests=240, bench=240, plan=180, largest=180, peer_largest=180,
                                 capped=180, compile=180, patchify=60, compile_ratio=180, e2e=180), total=900)
    return dict(device="cuda", precision="amp_bf16", bench_model="ViT-B-32", bench_batch=256,
                bench_ks=[4, 16], bench_steps=5,
                # (model, micro-batch, K, grad checkpointing, offload inputs)
                plan_configs=[("ViT-B-32", 256, 4, False, False), ("ViT-B-32", 256, 4, True, False),
                              ("ViT-B-32", 256, 16, False, True), ("ViT-L-14", 64, 4, False, False),
                              ("ViT-L-14", 64, 8, True, True)],
                largest_model="ViT-B-32", largest_micro=1024,
                # open_clip_train completed 16,384 and ran out of memory at 65,536 on the H200
                largest_start={PEER: 32768, BIGBATCH_OFFLOADED: 524288}, largest_cap=1 << 20,
                capped_model="ViT-L-14", capped_global=32768, capped_gib=24.0,
                compile_model="ViT-B-32", compile_batch=256, compile_k=4, compile_backend="inductor",
                e2e=dict(model="ViT-B-32", configs="128x4x8", samples=4096, image_size=224, epochs=2),
                patchify=dict(model="ViT-B-32", batches=[256, 1024], repeats=20),
                peaks=dict(tests=6, plan=26, capped=25, largest=44, compile=14), device_gib=None,
                # seconds, each part alone; on an H200: env 6, tests 33, bench 94 (three configurations;
                # the plain step per micro-batch adds about 15), plan 67, capped 110,
                # largest 220 (bigbatch's 524,288 step 189 of it), compile 108, patchify 15 (bench/gpu)
                budgets=dict(env=15, tests=45, bench=140, plan=80, capped=150, largest=240, peer_largest=60,
                             compile=130, patchify=30, compile_ratio=240, e2e=170), total=480)


class Recorder:
    """A part's results, rewritten to its JSON file after every measurement."""

    def __init__(self, path: Path, alone=lambda: 0.0):
        self.path, self.data = path, {"started": time.time()}
        self.alone = alone  # waits until the part has the device to itself; the seconds waited

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def append(self, key, value):
        self.data.setdefault(key, []).append(value)
        self.save()

    def save(self):  # whole or not at all: a part may be killed at any moment
        self.data["seconds"] = round(time.time() - self.data["started"], 1)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(partial, self.path)


# --------------------------------------------------------------------------- parts

def part_env(cfg: dict, rec: Recorder) -> None:
    import torch

    rec["torch"] = torch.__version__
    rec["python"] = platform.python_version()
    rec["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    rec["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec["device_name"] = props.name
        rec["device_memory_gib"] = round(props.total_memory / GiB, 1)
        rec["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
    else:
        rec["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for name in ("open_clip_torch", "timm", "webdataset", "numpy"):
        try:
            from importlib.metadata import version
            rec[name] = version(name)
        except Exception as error:  # a missing package is a finding, not a failure
            rec[name] = f"missing ({type(error).__name__})"


def part_tests(cfg: dict, rec: Recorder) -> None:
    """The CUDA tests (on CPU they are skipped, which proves they collect and run)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_cuda.py")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=cfg["budgets"]["tests"] - 10)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    rec["returncode"] = proc.returncode
    rec["summary"] = tail[-1] if tail else ""
    rec["output_tail"] = "\n".join(tail[-40:])


def part_bench(cfg: dict, rec: Recorder) -> None:
    from bigbatch.bench.command import parse_args
    from bigbatch.bench.runner import run

    for i, k in enumerate(cfg["bench_ks"]):
        argv = ["--device", cfg["device"], "--model", cfg["bench_model"], "--precision", cfg["precision"],
                "--batch-size", str(cfg["bench_batch"]), "--accum-freq", str(k),
                "--steps", str(cfg["bench_steps"]), "--warmup-steps", "1", "--loss-sizes", "",
                "--skip-max-batch", "--threads", "0", "--out", str(rec.path.parent)]
        profiled = i == 0  # where the first K's step time goes: the pieces apart, one step profiled
        result = run(parse_args(argv + ["--profile"] * profiled), log=lambda line: print(line, flush=True))
        rec.append("runs", {"accum_freq": k, "batch_size": cfg["bench_batch"],
                            "configs": _bench_summary(result["configs"]), "targets": result.get("targets"),
                            **{key: result[key] for key in ("phases", "profile") if key in result}})
        _free()


def _bench_summary(configs: dict) -> dict:
    keep = ("batch", "ratio_to_plain", "ratio_to_plain_micro", "speedup_vs_peer", "error")
    out = {}
    for name, c in configs.items():
        row = {k: c[k] for k in keep if k in c}
        row["samples_per_s"] = c.get("median_samples_per_s")
        memory = c.get("memory", {})
        row["peak_bytes"] = memory.get("cuda_peak_bytes", memory.get("live_peak_bytes"))
        out[name] = row
    return out


def part_plan(cfg: dict, rec: Recorder) -> None:
    from bigbatch import plan

    for model, b, k, checkpointing, offload in cfg["plan_configs"]:
        row = {"model": Path(model).stem, "batch_size": b, "accum_freq": k,
               "grad_checkpointing": checkpointing, "offload_inputs": offload}
        try:
            row["measured_bytes"], row["step_seconds"] = measure_step_peak(cfg, model, b, k, checkpointing, offload)
            row["step_seconds"] = round(row["step_seconds"], 2)
            options = plan.PlanOptions(model, precision=cfg["precision"], grad_checkpointing=checkpointing,
                                       offload_inputs=offload, target=cfg["device"])
            meta = plan.estimate_memory(options, batch_size=b, accum_freq=k)
            row["meta_estimate_bytes"] = meta.peak
            row["meta_error_percent"] = _percent(meta.peak, row["measured_bytes"])
            if cfg["device"] == "cuda":
                probe = plan.estimate_memory(dataclasses.replace(options, device="cuda"),
                                             batch_size=b, accum_freq=k)
                row["probe_bytes"] = probe.peak
                row["probe_error_percent"] = _percent(probe.peak, row["measured_bytes"])
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        rec.append("configs", row)
        _free()


def _percent(predicted: int, measured: int) -> float:
    return round(100 * (predicted - measured) / measured, 1)


def measure_step_peak(cfg: dict, model_name: str, b: int, k: int, checkpointing: bool,
                      offload: bool, reuse_inputs: bool = False) -> tuple[int, float]:
    from bigbatch import plan

    return plan.measure_peak(model_name, batch_size=b, accum_freq=k, precision=cfg["precision"],
                             grad_checkpointing=checkpointing, offload_inputs=offload,
                             device=cfg["device"], reuse_inputs=reuse_inputs)


class _Micro:
    """A micro-batch as the loader gives it: .images (uint8) and .texts."""

    def __init__(self, images, texts):
        self.images, self.texts = images, texts


def host_micro_batches(net, b: int, k: int, seed: int, pin: bool, distinct: bool = True) -> list:
    """K micro-batches of random uint8 images and token ids in host memory (pinned on CUDA);
    distinct=False reuses one micro-batch K times (huge K: host memory is finite)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = net.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    context, vocab = int(net.context_length), int(net.vocab_size)

    def one():
        images = torch.randint(0, 256, (b, 3, *size), dtype=torch.uint8, generator=g)
        texts = torch.randint(1, vocab, (b, context), generator=g)
        return _Micro(images.pin_memory() if pin else images, texts.pin_memory() if pin else texts)
    if distinct:
        return [one() for _ in range(k)]
    shared = one()
    return [shared] * k


def part_largest(cfg: dict, rec: Recorder) -> None:
    """bigbatch's largest global batch in one step, the inputs offloaded (a shared part: its
    figure is its own peak; its seconds are longer beside other parts)."""
    largest_batch(cfg, rec, BIGBATCH_OFFLOADED, cfg["budgets"]["largest"])


def part_peer_largest(cfg: dict, rec: Recorder) -> None:
    """Where open_clip_train's accumulation runs out of memory on the same work (alone: it
    takes the card's memory until it fails)."""
    largest_batch(cfg, rec, PEER, cfg["budgets"]["peer_largest"])


def largest_batch(cfg: dict, rec: Recorder, kind: str, budget: float) -> None:
    """Doubling the global batch from cfg["largest_start"][kind] until a step fails, passes
    the cap, or the next would overrun the budget: a doubled step takes a little over twice
    the last one, so the next is tried only if 2.5 times the last still fits. A start that
    already fails is halved until a step completes, so that both sides of the limit show.
    Beside other parts, running out of memory may be theirs: said so, not a limit."""
    deadline = time.time() + budget - 10
    n, last, failed_at, result = cfg["largest_start"][kind], None, None, {"trials": []}
    while n <= cfg["largest_cap"] and (failed_at is None or n < failed_at):
        if last is not None and time.time() + 2.5 * last > deadline:
            result["stopped"] = f"time budget (the next step would take about {2.5 * last:.0f}s)"
            break
        try:
            last, peak = one_big_step(cfg, kind, n)
            result["trials"].append({"global_batch": n, "seconds": round(last, 2), "peak_bytes": peak})
            result["largest_global_batch"] = max(n, result.get("largest_global_batch", 0))
        except Exception as error:  # running out of memory is the expected end
            oom = "out of memory" in str(error).lower()
            result["trials"].append({"global_batch": n, "error": "out of memory" if oom
                                     else f"{type(error).__name__}: {str(error)[:200]}"})
            beside = f" beside {', '.join(cfg['beside'])} (theirs, maybe: not the card's limit)" if cfg["beside"] else ""
            result["stopped"] = f"{'out of memory' if oom else 'error'} at {n}{beside}"
            failed_at = n
            if not (oom and "largest_global_batch" not in result and n > 1):
                break
            n //= 2
            continue
        finally:
            _free()
            rec["results"] = {kind: result}
        n *= 2
    else:
        if failed_at is None:
            result["stopped"] = f"reached the cap {cfg['largest_cap']}"
    rec["results"] = {kind: result}


def one_big_step(cfg: dict, kind: str, n: int) -> tuple[float, int | None]:
    """Seconds of one optimizer step over a global batch of n, and its CUDA peak bytes: one
    host micro-batch reused (host memory is finite), as bigbatch's training step with the
    inputs offloaded (plan.measure_peak), or as open_clip_train's."""
    import torch
    from bigbatch import plan
    from bigbatch.model import create_model
    from bigbatch.patch_embedding import use_conv_patch_embedding

    device = torch.device(cfg["device"])
    b = min(cfg["largest_micro"], n)
    if kind == BIGBATCH_OFFLOADED:
        peak, seconds = plan.measure_peak(cfg["largest_model"], batch_size=b, accum_freq=n // b,
                                          precision=cfg["precision"], offload_inputs=True,
                                          device=cfg["device"], reuse_inputs=True)
        return seconds, peak if device.type == "cuda" else None
    torch.manual_seed(0)
    net = create_model(cfg["largest_model"], device=device, tokenizer=False).model
    use_conv_patch_embedding(net)  # open_clip's own modules
    batches = host_micro_batches(net, b, n // b, seed=n, pin=device.type == "cuda", distinct=False)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    peer_step(cfg, net, batches)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peer_step(cfg: dict, net, batches) -> None:
    """One optimizer step of open_clip_train's own accumulation; its loader gives float32
    normalised images, which it moves to the device and keeps for all K micro-batches."""
    import types

    import open_clip
    import torch
    from open_clip_train.train import train_one_epoch

    from bigbatch.bench.peer import PeerData, PeerLoader, as_float, peer_args

    floats = as_float(batches[0].images)  # host memory: one, reused K times
    micro = [(floats, batches[0].texts)] * len(batches)
    data = {"train": PeerData(PeerLoader(micro))}
    args = peer_args(types.SimpleNamespace(
        device=cfg["device"], precision=cfg["precision"], accum_freq=len(batches),
        batch_size=len(floats)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    train_one_epoch(net, data, open_clip.ClipLoss(), 0, optimizer, None, None, None, args)


def part_capped(cfg: dict, rec: Recorder) -> None:
    """ViT-L-14 at 32,768 under a 24 GiB cap, at the micro-batch `--batch-size auto` picks."""
    import torch
    from bigbatch import plan

    device = torch.device(cfg["device"])
    cap = int(cfg["capped_gib"] * GiB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total, torch.cuda.current_device())
    rec["cap_bytes"] = cap
    options = plan.PlanOptions(cfg["capped_model"], precision=cfg["precision"], grad_checkpointing=True,
                               target=cfg["device"], gpu_memory=cap)
    b = plan.find_max_batch_size(options, global_batch_size=cfg["capped_global"], max_batch_size=1024)
    rec["planned_batch_size"] = b
    for _ in range(2):  # the planner's micro-batch, then half of it if that one failed
        k = cfg["capped_global"] // b
        try:
            peak, seconds = measure_step_peak(cfg, cfg["capped_model"], b, k, True, offload=False,
                                              reuse_inputs=True)
            rec["result"] = {"batch_size": b, "accum_freq": k, "global_batch": b * k,
                             "peak_bytes": peak, "under_cap": peak <= cap, "step_seconds": round(seconds, 1)}
            return
        except Exception as error:
            rec.append("failures", {"batch_size": b, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            _free()
            b //= 2


def part_compile(cfg: dict, rec: Recorder) -> None:
    """Seconds per accumulated step, eager and compiled, interleaved after the compile:
    bigbatch.bench.compile_speed's measurement, on this device. It compiles beside other
    parts (host work) and times with the device to itself."""
    import torch

    device = torch.device(cfg["device"])
    from bigbatch.bench.compile_speed import measure

    def alone():  # compiled beside other parts; timed with the device to itself
        rec["waited_for_device_s"] = round(rec.alone(), 1)

    result = measure(
        cfg["compile_model"], cfg["compile_batch"], cfg["compile_k"], device=device,
        backend=cfg["compile_backend"], precision=cfg["precision"], rounds=5 if device.type == "cuda" else 1,
        before_timing=alone)
    rec["compile_seconds"] = result.pop("compile_seconds")
    rec["result"] = result


def part_compile_ratio(cfg: dict, rec: Recorder) -> None:
    """accumulated/plain eager and under --torchcompile: compile_speed's measurement with
    the plain step beside the accumulated one, each on a copy of its own."""
    import torch

    from bigbatch.bench.compile_speed import measure

    device = torch.device(cfg["device"])
    rec["result"] = measure(cfg["compile_model"], cfg["compile_batch"], cfg["compile_k"], device=device,
                            backend=cfg["compile_backend"], precision=cfg["precision"],
                            rounds=5 if device.type == "cuda" else 1, plain=True)


def part_patchify(cfg: dict, rec: Recorder) -> None:
    """Median milliseconds of the patch embedding's forward + backward, as cuDNN's
    convolution and as the matrix product, interleaved. cuDNN keeps one plan per shape,
    whichever mode found it first, so its benchmark mode is set before the first call,
    as open_clip_train sets it (use_fast_cuda_math), and not compared with the heuristic's
    plan in the same process."""
    import copy
    import statistics

    import torch
    from bigbatch.device import autocast_factory, use_fast_cuda_math
    from bigbatch.model import create_model
    from bigbatch.patch_embedding import use_matmul_patch_embedding

    device, settings_ = torch.device(cfg["device"]), cfg["patchify"]
    use_fast_cuda_math()
    visual = create_model(settings_["model"], device="cpu", tokenizer=False).model.visual.to(device)
    conv = visual.conv1
    size = conv.kernel_size[0] * (224 // conv.kernel_size[0] if device.type == "cuda" else 2)
    autocast = autocast_factory(cfg["precision"], device)
    visual = copy.deepcopy(visual)
    use_matmul_patch_embedding(visual)
    matmul = visual.conv1
    ways = {"cudnn": conv, "matrix product": matmul}
    rec["cudnn_benchmark"] = True
    for batch in settings_["batches"]:
        images = torch.randn(batch, conv.in_channels, size, size, device=device)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(settings_["repeats"] + 2):  # two warm-ups (benchmark times its kernels)
            for name, module in (ways.items() if r % 2 else reversed(ways.items())):
                _sync(device)
                start = time.perf_counter()
                with autocast():
                    out = module(images)
                out.float().sum().backward()
                _sync(device)
                if r >= 2:
                    times[name].append(time.perf_counter() - start)
        rec.append("results", {"batch": batch, "image_size": size,
                               **{name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}})


def part_e2e(cfg: dict, rec: Recorder) -> None:
    """One interleaved round of whole runs (scripts/bench_e2e.py), on drawn PNG/JPEG files:
    wall time, training samples/s and data wait of each trainer, and the ratio to the peer's."""
    import tempfile

    e2e = cfg["e2e"]
    out = rec.path.parent
    with tempfile.TemporaryDirectory(prefix="gpu-check-e2e-") as work:
        command = [sys.executable, str(ROOT / "scripts" / "bench_e2e.py"), "--configs", e2e["configs"],
                   "--samples", str(e2e["samples"]), "--image-size", str(e2e["image_size"]),
                   "--epochs", str(e2e["epochs"]), "--pairs", "1", "--model-config", model_config(e2e["model"]),
                   "--device", cfg["device"], "--precision", cfg["precision"], "--work", work, "--out", str(out)]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=cfg["budgets"]["e2e"] - 10)
    rec["output_tail"] = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
    if proc.returncode != 0:
        raise RuntimeError(f"bench_e2e.py exited with {proc.returncode}")
    result = json.loads((out / f"e2e-{cfg['device']}.json").read_text())
    rec["configs"] = {name: {contender: {key: row[key]["median"] for key in
                                         ("wall_s", "wall_ratio_to_peer", "samples_per_s", "data_share") if key in row}
                             for contender, row in config["summary"].items()}
                      for name, config in result["configs"].items()}


def model_config(model: str) -> str:
    """A JSON config's path, or open_clip's own config file of a model it names."""
    if model.endswith(".json"):
        return model
    import open_clip
    return str(Path(open_clip.__file__).parent / "model_configs" / f"{model}.json")


# --------------------------------------------------------------------------- helpers

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# --------------------------------------------------------------------------- driver and report

def run_part(name: str, cfg: dict, out: Path) -> None:
    """In this process: one part, its JSON rewritten as it goes; a failure is recorded.
    CUDA math as both trainers set it (TF32, cuDNN benchmark); the device held alone or
    shared, as the part's figures need (scripts/gpu_schedule.py)."""
    if cfg["device"] == "cuda":
        from bigbatch.device import use_fast_cuda_math
        use_fast_cuda_math()
    with gpu_schedule.device_lock(out, exclusive=name in ALONE) as lock:
        rec = Recorder(out / f"part-{name}.json", alone=lock.make_exclusive)
        rec.data["beside"] = cfg["beside"]
        try:
            globals()[f"part_{name}"](cfg, rec)
            rec.data["status"] = "done"
        except Exception as error:
            rec.data["status"] = f"failed: {type(error).__name__}: " + (str(error).splitlines() or [""])[0][:300]
            rec.data["traceback"] = traceback.format_exc(limit=8)
    # when it had the device alone (from, if it did) and when it let go: the schedule, checked
    rec.data.update(exclusive_since=lock.exclusive_since, released_at=lock.releasing_at)
    rec.save()


def configure(args: argparse.Namespace) -> dict:
    """The settings, with the command line's overrides."""
    cfg = settings(args.smoke)
    if args.bench_ks:
        cfg["bench_ks"] = [int(k) for k in args.bench_ks.split(",")]
    if args.largest_start:
        cfg["largest_start"] = {**cfg["largest_start"], BIGBATCH_OFFLOADED: args.largest_start}
    if args.peer_largest_start:
        cfg["largest_start"] = {**cfg["largest_start"], PEER: args.peer_largest_start}
    for item in filter(None, (args.budgets or "").split(",")):
        name, _, seconds = item.partition("=")
        if name not in cfg["budgets"] or not seconds.isdigit():
            raise SystemExit(f"--budgets takes part=seconds pairs of {','.join(PARTS)}, not {item!r}")
        cfg["budgets"][name] = int(seconds)
    if args.total:
        cfg["total"] = args.total
    if args.part and args.part_budget:  # what the driver gives this part (a group: their sum)
        cfg["budgets"][args.part] = args.part_budget
    cfg["beside"] = [p for p in (args.beside or "").split(",") if p]
    return cfg


def run_all(parts: list[str], args: argparse.Namespace, out: Path, overrides: list[str]) -> dict:
    """The parts in child processes, alone or side by side (scripts/gpu_schedule.py), each
    under its budget and all under --total; the report rewritten after every group."""
    smoke, cfg = args.smoke, configure(args)
    started = time.time()
    deadline = started + cfg["total"]
    # the FIRST timed parts alone; then the shared parts, packed once env has told the card's
    # memory; then the other timed parts: under --total, the figures the targets need come first
    queue = [[p] for p in parts if p in FIRST or args.serial]
    rest = [] if args.serial else [p for p in parts if p not in FIRST]
    report = {"smoke": smoke, "settings": {k: v for k, v in cfg.items() if k != "budgets"},
              "budgets": cfg["budgets"], "total_limit_s": cfg["total"], "started_at": started, "parts": {}}
    while queue or rest:
        if not queue:
            queue = share_the_device(rest, cfg, report)
            rest = []
        group = queue.pop(0)
        if time.time() > deadline:
            report["parts"].update({n: {"status": "not run: the check's time limit (--total) was spent"} for n in group})
            continue
        # kernels of parts side by side take turns: each part of a group gets the group's sum
        budget = sum(cfg["budgets"][g] for g in group)
        print(f"== {' + '.join(group)} ({'side by side, ' if len(group) > 1 else ''}budget "
              f"{budget}s)", flush=True)
        for n in group:
            (out / f"part-{n}.json").unlink(missing_ok=True)
        commands = {n: [sys.executable, __file__, str(out), "--part", n, f"--part-budget={budget}",
                        f"--beside={','.join(g for g in group if g != n)}", *overrides] + (["--smoke"] if smoke else [])
                    for n in group}
        ran = gpu_schedule.run_group(commands, dict.fromkeys(group, budget), deadline, ROOT)
        busy = [n for n in group if record(n, ran[n], group, started, out, report) and len(group) > 1]
        if busy:  # the card takes one process at a time: those again, one after the other
            print(f"   the device is busy beside another process: {', '.join(busy)} again, alone", flush=True)
            queue[0:0] = [[n] for n in busy]
        report["wall_seconds"] = round(time.time() - started, 1)
        write_report(report, out)  # after every group: a run cut short still leaves one
    return report


def record(name: str, times: dict, group: list[str], started: float, out: Path, report: dict) -> bool:
    """A part's JSON into the report, with when it ran and beside what; whether it failed
    because the card would not take a second process."""
    path = out / f"part-{name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}  # written whole (Recorder.save)
    if "status" not in result:  # a part that finished keeps its word, even if stopped in its teardown
        result["status"] = times["stopped"] or "died without a word (see the output above)"
    result.update(start_s=round(times["start"] - started, 1), wall_seconds=round(times["end"] - times["start"], 1),
                  beside=[g for g in group if g != name])
    report["parts"][name] = result
    print(f"   {name}: {result['status']} in {result['wall_seconds']}s", flush=True)
    return gpu_schedule.said_busy(result)


def share_the_device(rest: list[str], cfg: dict, report: dict) -> list[list[str]]:
    """The groups the shared parts run in, packed into the card's memory, then the timed
    parts one by one; noted in the report."""
    known = report["parts"].get("env", {}).get("device_memory_gib")
    report["device_gib"] = gib = cfg["device_gib"] or gpu_schedule.sharing_memory_gib(known, sys.executable)
    report["side_by_side"] = gpu_schedule.pack([p for p in rest if p not in ALONE], cfg["peaks"], gib)
    return report["side_by_side"] + [[p] for p in rest if p in ALONE]


def write_report(report: dict, out: Path) -> None:
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))
    try:
        plot(report, out / "gpu-check.png")
    except Exception as error:  # a picture is not worth losing the numbers over
        print(f"   (no plot: {type(error).__name__}: {error})", flush=True)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def markdown(report: dict) -> str:
    parts = report["parts"]
    env = parts.get("env", {})
    lines = [f"# GPU check{' (smoke, CPU)' if report['smoke'] else ''}", "",
             f"Device: {env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda', '-')}, open_clip {env.get('open_clip_torch', '?')}; {env.get('date', '')}",
             "", f"The whole check: {report.get('wall_seconds', '-')} s (limit {report.get('total_limit_s', '-')} s). "
             + ("Parts whose figures are their own peaks or pass/fail ran side by side, the timed ones alone."
                if any(p.get("beside") for p in parts.values()) else "One part at a time."),
             "", "| part | status | started at s | seconds | beside |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {p.get('status', '?')} | {p.get('start_s', '-')} | {p.get('wall_seconds', '-')} | "
              f"{', '.join(p.get('beside', [])) or '-'} |" for name, p in parts.items()]
    tests = parts.get("tests", {})
    if tests:
        lines += ["", f"CUDA tests: `{tests.get('summary', '-')}`"]
    for run in parts.get("bench", {}).get("runs", []):
        lines += ["", f"## Step benchmark, micro-batch {run['batch_size']} x K = {run['accum_freq']}", "",
                  "| configuration | batch | samples/s | ratio to plain | ratio to plain per micro-batch | "
                  "speed-up vs open_clip_train | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in run["configs"].items():
            lines.append(f"| {name} | {c.get('batch', '')} | {_num(c.get('samples_per_s'))} | "
                         f"{_num(c.get('ratio_to_plain'))} | {_num(c.get('ratio_to_plain_micro'))} | "
                         f"{_num(c.get('speedup_vs_peer'))} | "
                         f"{_gib(c.get('peak_bytes'))} |"
                         + (f" {c['error'][:80]}" if c.get("error") else ""))
    plans = parts.get("plan", {}).get("configs", [])
    if plans:
        lines += ["", "## Planner against measured peak", "", *_shared(parts["plan"]),
                  "| model | b x K | grad ckpt | offload | measured GiB | meta GiB (err %) | probe GiB (err %) | step s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in plans:
            lines.append(f"| {r['model']} | {r['batch_size']} x {r['accum_freq']} | {r['grad_checkpointing']} | "
                         f"{r['offload_inputs']} | {_gib(r.get('measured_bytes'))} | "
                         f"{_gib(r.get('meta_estimate_bytes'))} ({r.get('meta_error_percent', '-')}) | "
                         f"{_gib(r.get('probe_bytes'))} ({r.get('probe_error_percent', '-')}) | "
                         f"{r.get('step_seconds', r.get('error', '-'))} |")
    largest = {**parts.get("peer_largest", {}).get("results", {}), **parts.get("largest", {}).get("results", {})}
    if largest:
        lines += ["", "## Largest global batch in one step", "", *_shared(parts.get("largest", {})),
                  "| configuration | largest | stopped | trials |",
                  "|---|---|---|---|"]
        for kind, r in largest.items():
            trials = ", ".join(f"{t['global_batch']}: " + (f"{t['seconds']} s, {_gib(t.get('peak_bytes'))} GiB"
                                                            if "seconds" in t else t["error"]) for t in r["trials"])
            lines.append(f"| {kind} | {r.get('largest_global_batch', '-')} | {r.get('stopped', '-')} | {trials} |")
    capped = parts.get("capped", {})
    if capped.get("result") or capped.get("failures"):
        r = capped.get("result", {})
        lines += ["", "## Under a memory cap", "", *_shared(capped),
                  f"Cap {_gib(capped.get('cap_bytes'))} GiB; planner's micro-batch {capped.get('planned_batch_size')}; "
                  + (f"ran {r['batch_size']} x {r['accum_freq']} = {r['global_batch']} with grad checkpointing, "
                     f"peak {_gib(r['peak_bytes'])} GiB (under the cap: {r['under_cap']}), step {r['step_seconds']} s"
                     if r else "no step completed")
                  + "".join(f"; failed at {f['batch_size']}: {f['error'][:100]}" for f in capped.get("failures", []))]
    for name, contenders in parts.get("e2e", {}).get("configs", {}).items():
        lines += ["", f"## Whole runs, {name} (scripts/bench_e2e.py, one round)", "",
                  "| trainer | wall s | wall / peer | train samples/s | data wait |", "|---|---|---|---|---|"]
        for contender, r in contenders.items():
            data_share = f"{r['data_share']:.0%}" if "data_share" in r else "-"
            lines.append(f"| {contender} | {_num(r.get('wall_s'))} | {_num(r.get('wall_ratio_to_peer'))} | "
                         f"{_num(r.get('samples_per_s'))} | {data_share} |")
    patchify = parts.get("patchify", {}).get("results", [])
    if patchify:
        lines += ["", "## Patch embedding, forward + backward (ms, median)", "",
                  "| batch | cuDNN convolution | matrix product |", "|---|---|---|"]
        lines += [f"| {r['batch']} | {r['cudnn']} | {r['matrix product']} |"
                  for r in patchify]
    compiled = parts.get("compile", {}).get("result")
    if compiled:
        lines += ["", "## --torchcompile", "", *_shared(parts["compile"], "its compiling (timed with the device alone)"),
                  f"{compiled['batch']} accumulated step, {compiled['backend']}: eager "
                  f"{compiled['eager_samples_per_s']} samples/s, compiled {compiled['compiled_samples_per_s']} "
                  f"samples/s ({compiled['speedup']}x), compile {parts['compile'].get('compile_seconds')} s"]
    ratio = parts.get("compile_ratio", {}).get("result")
    if ratio:
        from bigbatch.bench.compile_speed import plain_table
        lines += ["", f"## Accumulated / plain under --torchcompile ({ratio['backend']})", "", *plain_table(ratio)]
    return "\n".join(lines) + "\n"


def _shared(part: dict, what: str = "its seconds") -> list[str]:
    """A note for a part that ran beside others: their kernels took turns with its own."""
    beside = part.get("beside")
    return [f"Ran beside {', '.join(beside)}: {what} include their turns on the device.", ""] if beside else []


def _num(value) -> str:
    return "-" if value is None else f"{value:,.2f}" if isinstance(value, float) else str(value)


def plot(report: dict, path: Path) -> None:
    """Samples/s and peak memory of the bench's configurations; planner against measured;
    when each part ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["parts"].get("bench", {}).get("runs", [])
    plans = [r for r in report["parts"].get("plan", {}).get("configs", []) if "measured_bytes" in r]
    fig, grid = plt.subplots(2, 2, figsize=(14, 8.4))
    axes = grid.ravel()
    for i, run in enumerate(runs):
        width = 0.8 / max(1, len(run["configs"]))
        for j, (name, c) in enumerate(run["configs"].items()):
            x = i + (j - (len(run["configs"]) - 1) / 2) * width
            axes[0].bar(x, c.get("samples_per_s") or 0, width, color=f"C{j}", label=name if i == 0 else None)
            axes[1].bar(x, (c.get("peak_bytes") or 0) / GiB, width, color=f"C{j}", label=name if i == 0 else None)
    for ax, title in ((axes[0], "samples/s"), (axes[1], "peak memory (GiB)")):
        ax.set_xticks(range(len(runs)), [f"{r['batch_size']} x {r['accum_freq']}" for r in runs])
        ax.set_title(title)
        if runs:
            ax.legend(fontsize=7)
    labels = [f"{r['model']}\n{r['batch_size']}x{r['accum_freq']}{' gc' if r['grad_checkpointing'] else ''}"
              f"{' off' if r['offload_inputs'] else ''}" for r in plans]
    axes[2].bar([i - 0.2 for i in range(len(plans))], [r["measured_bytes"] / GiB for r in plans], 0.4, label="measured")
    axes[2].bar([i + 0.2 for i in range(len(plans))], [r["meta_estimate_bytes"] / GiB for r in plans], 0.4,
                label="bigbatch plan")
    axes[2].set_xticks(range(len(plans)), labels, fontsize=7)
    axes[2].set_title("planned vs measured peak (GiB)")
    axes[2].legend(fontsize=7)
    timeline(report, axes[3])
    device = report["parts"].get("env", {}).get("device_name", "?")
    fig.suptitle(f"bigbatch GPU check on {device}{' (smoke)' if report['smoke'] else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(report: dict, ax) -> None:
    """One bar per part, from its start to its end: which ran side by side."""
    ran = [(name, p) for name, p in report["parts"].items() if "start_s" in p]
    for i, (name, p) in enumerate(ran):
        ax.barh(i, p["wall_seconds"], left=p["start_s"], color="C1" if p.get("beside") else "C0")
    ax.set_yticks(range(len(ran)), [name for name, _ in ran], fontsize=8)
    ax.invert_yaxis()
    limit = report.get("total_limit_s")
    if limit:
        ax.axvline(limit, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("seconds since the start (dashed: --total)")
    ax.set_title(f"timeline: {report.get('wall_seconds', '-')} s in all (orange: side by side)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bigbatch's one GPU check (see the module docstring).")
    parser.add_argument("out", type=Path, help="folder for gpu-check.{json,md,png}")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: every line runs in seconds")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all but compile_ratio and e2e)")
    parser.add_argument("--total", type=int, help="seconds for the whole check (default 480; --smoke 900): "
                                                  "a part still running then is stopped, with what it has")
    parser.add_argument("--serial", action="store_true",
                        help="every part alone, one after the other (no parts side by side)")
    parser.add_argument("--bench-ks", help="accum-freqs of the step benchmark, e.g. 4,16 (default: the settings')")
    parser.add_argument("--largest-start", type=int, help="bigbatch's first global batch in the largest-batch search")
    parser.add_argument("--peer-largest-start", type=int,
                        help="open_clip_train's first global batch in the largest-batch search")
    parser.add_argument("--budgets", help="seconds per part instead of the settings', e.g. largest=260,compile=120")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process,
    parser.add_argument("--part-budget", type=int, help=argparse.SUPPRESS)  # under this budget,
    parser.add_argument("--beside", help=argparse.SUPPRESS)  # beside these parts
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, configure(args), args.out)
        return 0
    # a stopped driver stops its parts (gpu_schedule.run_group's cleanup runs on the exception)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("gpu_check: stopped (SIGTERM)"))
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}: choose from {','.join(PARTS)}")
    overrides = [f"--{k.replace('_', '-')}={v}" for k, v in (
        ("bench_ks", args.bench_ks), ("largest_start", args.largest_start),
        ("peer_largest_start", args.peer_largest_start), ("budgets", args.budgets), ("total", args.total)) if v]
    report = run_all(parts, args, args.out, overrides)
    print()
    print(markdown(report))
    print(f"written to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
