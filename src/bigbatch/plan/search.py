"""A plan for one batch layout, and the search for the largest micro-batch that fits."""

from __future__ import annotations

import dataclasses

import torch

from bigbatch.errors import ConfigError
from bigbatch.plan.formula import MemoryPlan, PlanOptions, assemble
from bigbatch.plan.measure import meta_profile, with_teacher
from bigbatch.plan.probe import cuda_profile
from bigbatch.plan.report import no_fit_message
from bigbatch.plan.sizes import derive_accum_freq, divisors, gib


def estimate_memory(options: PlanOptions, *, batch_size: int, accum_freq: int) -> MemoryPlan:
    """The per-rank memory plan of one step of b x K x W samples (bigbatch.plan.formula):
    its activations from a forward on fake tensors, or, with options.device "cuda", from
    one micro-batch probed on that GPU."""
    for name, value in (("batch-size", batch_size), ("accum-freq", accum_freq),
                        ("world-size", options.world_size)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    measure = cuda_profile if options.probes else meta_profile
    profile = with_teacher(measure(options, batch_size), options)
    activations = profile.checkpointed if options.grad_checkpointing else profile.activations
    return assemble(profile, activations, batch_size, accum_freq, options)


def find_max_batch_size(options: PlanOptions, *, global_batch_size: int | None = None,
                        accum_freq: int | None = None, max_batch_size: int = 1 << 16,
                        confirm: bool = True) -> int:
    """The largest micro-batch whose predicted peak fits in `gpu_memory x (1 - reserve)`.

    With `global_batch_size` only micro-batches that divide G / world_size are candidates,
    each with its own accum_freq (`derive_accum_freq`); otherwise accum_freq stays fixed
    (default 1). The peak grows with the micro-batch, so this is a binary search. Its
    activations come from a line a + c x b through two meta forwards (exact for
    transformers), and the answer is checked with a meta forward at its own size. On
    CUDA (options.device) with `confirm`, the answer is then probed for real, stepping
    down on OOM. Raises ConfigError, naming the fixes, when not even the smallest
    candidate fits.
    """
    if options.gpu_memory is None:
        raise ValueError("find_max_batch_size needs PlanOptions.gpu_memory")
    W = options.world_size
    if global_batch_size is not None:
        if global_batch_size % W:
            derive_accum_freq(global_batch_size, 1, W)  # raises, naming the fix
        candidates = [d for d in divisors(global_batch_size // W) if d <= max_batch_size]
    else:
        candidates = list(range(1, max_batch_size + 1))

    def accum(b: int) -> int:
        if global_batch_size is None:
            return accum_freq or 1
        return global_batch_size // (W * b)

    meta = dataclasses.replace(options, device="cpu")
    usable = options.gpu_memory * (1 - options.reserve)

    def exact(b: int) -> MemoryPlan:
        return estimate_memory(meta, batch_size=b, accum_freq=accum(b))

    field = "checkpointed" if options.grad_checkpointing else "activations"
    (b1, p1), (b2, p2) = [(b, with_teacher(meta_profile(meta, b), meta)) for b in (8, 16)]
    slope = (getattr(p2, field) - getattr(p1, field)) / (b2 - b1)
    intercept = getattr(p1, field) - slope * b1

    def fits(i: int) -> bool:
        b = candidates[i]
        return assemble(p1, int(intercept + slope * b), b, accum(b), meta).peak <= usable

    lo, hi, best = 0, len(candidates) - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    while best >= 0 and exact(candidates[best]).peak > usable:
        best -= 1  # the line was optimistic at this size
    if best < 0:
        raise ConfigError(no_fit_message(exact(candidates[0])))
    if confirm and options.probes and torch.cuda.is_available():
        best = _largest_probed(options, candidates, best, accum, usable)
    return candidates[best]


def _largest_probed(options: PlanOptions, candidates: list[int], best: int, accum, usable: float) -> int:
    """From candidates[best] down, the first whose plan probed on the GPU fits."""
    while best >= 0:
        b = candidates[best]
        try:
            if estimate_memory(options, batch_size=b, accum_freq=accum(b)).peak <= usable:
                return best
        except ConfigError:  # the probe ran out of memory
            pass
        best -= 1
    raise ConfigError(f"no micro-batch of {options.model} fits {gib(options.gpu_memory)} GiB "
                      f"when probed on {options.device}: see `bigbatch plan` for the fixes")


def inputs_must_wait_on_host(options: PlanOptions, *, batch_size: int, accum_freq: int) -> MemoryPlan | None:
    """Whether --offload-inputs is needed: the plan with all K micro-batches' inputs on the GPU
    when it does not fit in `options.gpu_memory` but the offloaded one does (None otherwise)."""
    on_device = estimate_memory(dataclasses.replace(options, offload_inputs=False),
                                batch_size=batch_size, accum_freq=accum_freq)
    if on_device.fits or on_device.accum_freq == 1:
        return None
    offloaded = estimate_memory(dataclasses.replace(options, offload_inputs=True),
                                batch_size=batch_size, accum_freq=accum_freq)
    return on_device if offloaded.fits else None
