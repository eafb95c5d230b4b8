"""The memory study: one untimed step of a configuration under bigbatch.memory's meter.

- everywhere, the peak bytes saved for backward (each storage once, weights, optimizer
  state and inputs excluded);
- on CPU, also the peak live bytes of every tensor created during the step: the CPU
  analogue of the GPU's allocator peak, temporaries included;
- on CUDA, `torch.cuda.max_memory_allocated()` over the step, less what was allocated
  before it, plus this configuration's own weights and optimizer state: what a run of
  this configuration alone would show (the other configurations' copies excluded)."""

from __future__ import annotations

import gc

import torch

from bigbatch.bench.environment import synchronize
from bigbatch.bench.setups import Setup
from bigbatch.memory import MemoryMeter, storage_keys, tensor_bytes


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

