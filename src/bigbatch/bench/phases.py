"""Where a step's time goes: its pieces timed apart, and one step of each configuration profiled."""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from bigbatch.bench.environment import load_average, synchronize
from bigbatch.bench.setups import Setup
from bigbatch.build import adamw
from bigbatch.device import autocast_factory
from bigbatch.losses import ClipLoss
from bigbatch.model import parameter_groups


def phase_times(model, args, batches, repeats: int = 10) -> dict:
    """Medians of the pieces a step is made of, measured interleaved, to explain the ratios.

    f0(n): forward without grad; for K > 1 also f0((K-1)*b), a what-if: pass 1's cached
      micro-batches as one forward (the engine runs them one by one);
    fb(n): forward + loss + backward into empty .grad;
    fbK: K x fb(b) accumulating into .grad (what both accumulations back-propagate);
    opt: the AdamW step + zero_grad, the trainer's fused one; peer_opt: torch's default
    AdamW, which open_clip_train builds. Predicted step seconds:
      plain = fb(K*b) + opt
      bigbatch = (K-1) f0(b) + fbK + opt   (its last micro-batch keeps its graph)
      open_clip_train = K f0(b) + fbK + peer_opt (+ K losses over N instead of 1)
    All pieces run on `model`, bigbatch's (on CUDA its matrix-product patch embedding,
    which the peer itself does not run).
    """
    device = torch.device(args.device)
    model = copy.deepcopy(model).train()
    optimizer = adamw(parameter_groups(model, args.wd), lr=args.lr)
    peer_optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr)
    images, texts = batches[0]
    b, k = args.batch_size, args.accum_freq
    n = b * k
    loss_fn = ClipLoss()
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
    if k > 1:
        pieces["forward_nograd_K_minus_1_micro_s"] = lambda: forward_nograd((k - 1) * b)
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
               # against K plain steps of b: the same memory class, the recompute's own cost
               predicted_ratio_accum_vs_plain_micro=k * (out["forward_backward_micro_s"] + opt)
               / out["predicted_accum_s"],
               load_average=load_average())
    return out


# The host calls that block until the device is done (cudaMemcpy: a copy to pageable memory);
# cudaMemcpyAsync does not block from pinned memory, and is counted apart, as copies.
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
COPY_CALLS = {"cudaMemcpyAsync"}


def profile_steps(setups: list[Setup], out_path: Path, round_index: int) -> dict:
    """One step of each setup under torch.profiler: the top ops by self time, as text; and
    a summary of each step: its wall seconds, the device's time (its kernels', copies' and
    memsets' self times summed over all streams: below the wall, the device waited for the
    host; above it, streams overlapped), the host's blocking calls (a sync stalls the
    launch queue) and its asynchronous copies, to tell a slow kernel from an idle device.
    The profiler's own overhead lengthens every step's wall time (more for many small ops)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    if not cuda:  # the profiler's "ERROR ... gpuGetDeviceCount failed" of a CUDA build on a CPU
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sections, summary = [], {}
    for setup in setups:
        device = next(setup.model.parameters()).device
        synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            setup.step(round_index)
            synchronize(device)
            wall = time.perf_counter() - start
        averages = prof.key_averages()
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        device_time = sum(e.self_device_time_total for e in kernels) / 1e6 if cuda else None
        summary[setup.name] = {
            "wall_s": round(wall, 4), "device_time_s": device_time and round(device_time, 4),
            "device_time_share": device_time and round(device_time / wall, 3),
            "host_syncs": {e.key: e.count for e in averages if e.key in SYNC_CALLS},
            "host_async_copies": sum(e.count for e in averages if e.key in COPY_CALLS)}
        table = None
        for sort in (["self_device_time_total", "self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
            with contextlib.suppress(Exception):
                table = averages.table(sort_by=sort, row_limit=25)
                break
        sections.append(f"## {setup.name} ({setup.batch_label})\n{summary[setup.name]}\n{table}")
    out_path.write_text("\n\n".join(sections) + "\n")
    return summary
