"""One optimizer step's pieces around the engine: its micro-batches as the loader gives
them, their way to the device, the learning-rate schedule, clipping, the update and the
scalars a progress line reads. The loop in train.py puts them in order.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Iterable, Iterator

import torch

from bigbatch.config import TrainConfig
from bigbatch.distributed import as_local, keeps_gradients
from bigbatch.inputs import DeviceCopier
from bigbatch.model import unwrap

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: temperature no lower than 0.01


class StepBatches:
    """One optimizer step's micro-batches, `accum_freq` of them (fewer at the epoch's end),
    taken from the loader only when the step asks for the next one: loading overlaps pass 1.
    Iterate it once, to its end. It counts what it gave, for the log; it holds no batch."""

    def __init__(self, batches: Iterator, first, accum_freq: int, waited: float):
        self.batches, self.first, self.accum_freq = batches, first, accum_freq
        self.data_seconds = waited  # spent waiting for the loader
        self.count, self.samples, self.skipped = 0, 0, Counter()

    def __iter__(self) -> Iterator:
        batch, self.first = self.first, None
        while batch is not None:
            self.count += 1
            self.samples += len(batch.images)
            self.skipped.update(batch.skipped)
            yield batch
            if self.count == self.accum_freq:
                return
            batch = self._next()

    def _next(self):
        start = time.perf_counter()
        batch = next(self.batches, None)
        self.data_seconds += time.perf_counter() - start
        return batch


def step_micro_batches(loader: Iterable, accum_freq: int) -> Iterator[StepBatches]:
    """The epoch's steps; each one's first micro-batch is taken before the step starts (there
    is a step only if there is a batch)."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        first = next(batches, None)
        if first is None:
            return
        yield StepBatches(batches, first, accum_freq, time.perf_counter() - start)


def step_inputs(micro_batches: Iterable, device: torch.device, offload: bool):
    """The step's (images, texts) micro-batches as they arrive (uint8 images, pinned for a
    GPU) and the move cached_backward applies before each forward. Each goes to the device
    on arrival; or, with --offload-inputs, stays on the host and is copied one ahead of the
    forward that needs it: pass 1 in order, then pass 2's recomputes (all but the last)."""
    copier = DeviceCopier(device)

    def arriving() -> Iterator[tuple]:
        host = []
        for b in micro_batches:
            inputs = (b.images, b.texts)
            if not offload:
                yield copier(inputs)  # later moves of device tensors are no-ops
                continue
            copier.expect(inputs)
            host.append(inputs)
            yield inputs
        copier.expect(*host[:-1])  # pass 2's order, known once the engine looks past the last

    return arriving(), copier


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup over `warmup` optimizer steps, then cosine to zero, constant, or
    constant until the last --epochs-cooldown epochs decay it polynomially to
    --lr-cooldown-end. --skip-scheduler: --lr throughout."""
    if cfg.skip_scheduler:
        return cfg.lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_scheduler == "const":
        return cfg.lr
    if cfg.lr_scheduler == "const-cooldown":
        cooldown = total_steps // cfg.epochs * cfg.epochs_cooldown  # steps per epoch x epochs
        start = total_steps - cooldown
        if step < start:
            return cfg.lr
        decay = (1 - (step - start) / cooldown) ** cfg.lr_cooldown_power
        return decay * (cfg.lr - cfg.lr_cooldown_end) + cfg.lr_cooldown_end
    progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * cfg.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """The schedule's lr, times each group's scale (layer decay, tower lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def unscale_and_clip(model, optimizer, scaler, clip_norm: float | None) -> torch.Tensor:
    """Unscale (fp16) the accumulated gradient and clip it; its global norm before clipping
    (a tensor on the device: no host sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm is not None:
        return as_local(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return as_local(torch.nn.utils.get_total_norm(grads))


def optimizer_step(model, optimizer, scaler, apply: bool = True) -> None:
    """Step (unless a non-finite step is dropped), zero the gradient, clamp the logit scale."""
    if scaler is not None:
        if apply:
            scaler.step(optimizer)
        scaler.update()
    elif apply:
        optimizer.step()
    # dropped (no memory between steps), except DDP's, which are views of its buckets
    optimizer.zero_grad(set_to_none=not keeps_gradients(model))
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def logged_scalars(model, grad_norm: torch.Tensor, nonfinite_steps: int, loss_fn=None) -> dict[str, float]:
    """What a progress line adds to the loss: read at log steps only (host syncs; FSDP2's
    full logit scale is a collective, and every rank logs at the same steps); and the
    loss's parts where it has them (distillation's `contrastive_loss`, `distill_loss`)."""
    terms = {name: term.item() for name, term in getattr(loss_fn, "terms", {}).items()}
    return {"logit_scale": as_local(unwrap(model).logit_scale).exp().item(),
            "grad_norm": grad_norm.item(), "nonfinite_steps": nonfinite_steps, **terms}
