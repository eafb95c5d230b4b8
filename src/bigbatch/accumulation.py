"""Feature-cached gradient accumulation: the large-batch gradient at one micro-batch's memory.

A contrastive loss couples every sample with every other one, so the gradient of K
micro-batches is not the sum of their separate gradients. `cached_backward` computes
the exact gradient of the loss over their concatenation in three stages:

1. Pass 1, no grad. Each micro-batch x_j is embedded under `torch.no_grad()` after its
   RNG states (CPU and CUDA) are saved; its features f_j (B_j, D) are cached. The last
   micro-batch runs with grad instead and keeps its graph: it is not recomputed.
2. Loss once. The cached features are concatenated into leaves (N, D) that require
   grad, the loss is taken over the whole batch with the live logit_scale/logit_bias,
   and one backward gives g_j = dL/df_j and dL/d(scalar outputs). Only the last
   micro-batch's graph is alive meanwhile, and the logits are freed before pass 2:
   peak memory is one micro-batch of activations plus the loss, never K micro-batches.
3. Pass 2, recompute. Each cached micro-batch is run again with grad under its saved
   RNG states (same dropout masks), and `backward(f_j, g_j)` accumulates its share
   into `.grad`. Model-level scalars (logit_scale, logit_bias) receive their gradient
   exactly once. BatchNorm running statistics are restored after each recompute, so
   they move once per sample. Under DDP/FSDP2 only the last backward synchronises.

Model outputs are a dict like open_clip's `output_dict=True`: tensors with a batch
dimension (ndim >= 2, e.g. image_features (B, D)) are per-sample and concatenated;
tensors with ndim <= 1 (logit_scale, logit_bias) are model-level and taken once;
anything else is passed to the loss unchanged.

A frozen tower (all its parameters without grad, deterministic: eval mode) is run in
pass 1 only: name its input's position in `frozen_inputs` and pass 2 calls the model
with None there (open_clip models then skip that tower); its cached features need no
gradient. It must draw no random numbers, or the other tower's replayed masks shift.

A teacher (distillation: a frozen model whose outputs the loss reads) is run in pass 1
only, right after the model on the same inputs, under no_grad: its outputs join the
micro-batch's under their own keys, are cached and concatenated like the model's, get
no gradient and are never recomputed. Run after the model's forward, it cannot shift the
replayed masks; it should still be deterministic (eval mode), as it runs once.

A loss whose terms do not couple samples (CoCa's captioning, a `SampleLoss`) is taken
in pass 2 only, on each micro-batch's own outputs, and back-propagated together with its
feature slice: the outputs it reads (caption logits (B, T, vocab)) are never cached.

K = 1 is the plain step: one forward, one backward, nothing cached.

The micro-batches may come from any iterable, a loader included: each one is taken when
pass 1 reaches it, so loading the next overlaps this one's forward. One is taken ahead,
so that the last one is known before its forward (it runs with grad).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, ContextManager, Iterable, Protocol, Sequence

import torch
from torch import nn

from bigbatch.distributed import mean_over_ranks

MicroBatch = Sequence[Any]  # positional model inputs, e.g. (images, texts)
LossFn = Callable[..., torch.Tensor]


class SampleLoss(Protocol):
    """A loss that is a sum of per-sample terms over a normaliser (a mean over tokens).

    keys: the model outputs only this loss reads; they are never cached or concatenated.
    count(outputs): the number of terms in one micro-batch (called in pass 1).
    __call__(outputs, total): one micro-batch's terms summed and divided by `total`, the
        step's count over all ranks divided by the world size (DDP averages gradients
        over ranks), so that the micro-batches' calls add up to the global batch's mean.
    """

    keys: Collection[str]

    def count(self, outputs: dict) -> torch.Tensor: ...

    def __call__(self, outputs: dict, total: torch.Tensor) -> torch.Tensor: ...


def cached_backward(
    model: nn.Module,
    micro_batches: Iterable[MicroBatch],
    loss_fn: LossFn,
    *,
    autocast: Callable[[], ContextManager] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    frozen_inputs: Sequence[int] = (),
    to_device: Callable[[MicroBatch], MicroBatch] | None = None,
    sample_loss: SampleLoss | None = None,
    teacher: Callable[..., dict] | None = None,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of `loss_fn` over all micro-batches together.

    Args:
        model: called as `model(*micro_batch)`, returns a dict of outputs.
        micro_batches: K tuples of model inputs, a list or an iterator (taken one ahead
            of pass 1's forwards); sizes may differ (a smaller last one).
        loss_fn: called with the model's output keys as keyword arguments, over the
            concatenated batch; returns a scalar.
        autocast: a factory of the mixed-precision context (e.g. a partial of
            `torch.autocast`) wrapped around every forward and the loss.
        grad_scaler: fp16 loss scaling; the loss is scaled before its backward and
            every feature gradient carries the same scale.
        frozen_inputs: positions in each micro-batch of inputs whose tower is frozen and
            deterministic; pass 2 does not recompute it.
        to_device: applied to a micro-batch right before each of its forwards, so that
            cached inputs can wait in pinned host memory (huge K) instead of on the GPU;
            in pass 2 a frozen tower's input arrives as None.
        sample_loss: a loss whose terms do not couple samples (CoCa's caption loss),
            added to `loss_fn`'s and taken per micro-batch in pass 2; `loss_fn` does not
            see its keys. It may need every tower, so it rules out `frozen_inputs`.
        teacher: called like the model, once per micro-batch in pass 1 (no grad); returns
            outputs for the loss under keys the model does not use (e.g. `dist_image_features`),
            constants of the step: no gradient, no recompute.

    Returns:
        The loss, detached: `loss_fn`'s plus the sample loss over the whole batch.
    """
    batches = iter(micro_batches)
    current, upcoming = next(batches, None), next(batches, None)
    if current is None:
        raise ValueError("cached_backward needs at least one micro-batch")
    if sample_loss is not None and frozen_inputs:
        raise ValueError("a sample loss reads every tower's outputs: pass no frozen_inputs with it")
    autocast = autocast or contextlib.nullcontext
    scale = grad_scaler.scale if grad_scaler is not None else (lambda loss: loss)
    move = to_device or (lambda inputs: inputs)
    sample_keys = set(sample_loss.keys) if sample_loss is not None else set()

    if upcoming is None:
        with _gradient_sync(model, enabled=True):
            with autocast():
                inputs = move(current)
                out = _with_teacher(model(*inputs), teacher, inputs)
                loss = loss_fn(**_drop(out, sample_keys))
                if sample_loss is not None:
                    term = sample_loss(out, mean_over_ranks(sample_loss.count(out).float()))
            del out, inputs  # CoCa's caption logits: its backward keeps what it needs (see pass 2)
            scale(loss if sample_loss is None else loss + term).backward()
        return loss.detach() if sample_loss is None else loss.detach() + mean_over_ranks(term)

    cuda_devices = _cuda_devices(model, current)

    # Pass 1: embed without grad, each micro-batch as it arrives (the next one is taken
    # first: only then is this one known not to be the last); the last micro-batch keeps
    # its graph. A sample loss's outputs are only counted here, never kept.
    cached_inputs, rng_states, cached, counts = [], [], [], []
    while upcoming is not None:
        rng_states.append(_RngState.capture(cuda_devices))
        with torch.no_grad(), autocast():
            inputs = move(current)
            out = _with_teacher(model(*inputs), teacher, inputs)
            del inputs
            if sample_loss is not None:
                counts.append(sample_loss.count(out))
            cached.append(_drop(out, sample_keys))
            del out
        cached_inputs.append(current)
        current, upcoming = upcoming, next(batches, None)
    with _gradient_sync(model, enabled=False), autocast():
        inputs = move(current)
        last_out = _with_teacher(model(*inputs), teacher, inputs)
        del inputs
    rng_after_pass1 = _RngState.capture(cuda_devices)
    if sample_loss is not None:
        with torch.no_grad():
            counts.append(sample_loss.count(last_out))
        sample_total = mean_over_ranks(torch.stack(counts).sum().float())
    sample_terms = []  # this rank's, detached

    # Loss once over the global batch; backward stops at the cached features.
    outputs = cached + [last_out]
    per_sample_keys = [k for k, v in last_out.items() if _is_per_sample(v) and k not in sample_keys]
    sizes = [_batch_size(out, per_sample_keys) for out in outputs]
    # outputs the kept graph does not reach (a teacher's, a frozen tower's) need no gradient;
    # joined one key at a time, each key's cached pieces freed once joined (never all twice)
    leaves = {}
    for k in per_sample_keys:
        pieces = [out.pop(k) for out in cached] + [last_out[k].detach()]
        leaves[k] = _leaf(torch.cat(pieces), last_out[k].requires_grad)
        del pieces
    shared = {k: _leaf(v.detach(), v.requires_grad) if _is_model_level(v) else v
              for k, v in last_out.items() if k not in leaves and k not in sample_keys}
    del outputs, cached  # the concatenated leaves replace the micro-batches' features
    with autocast():
        loss = loss_fn(**leaves, **shared)
    scale(loss).backward()
    loss = loss.detach()  # its graph would keep the leaves alive through pass 2
    slices = {k: leaf.grad.split(sizes) for k, leaf in leaves.items() if leaf.grad is not None}
    shared_grads = {k: v.grad for k, v in shared.items()
                    if isinstance(v, torch.Tensor) and v.grad is not None}
    del leaves, shared  # frees the logits' and features' working set

    # Pass 2: the kept graph first, then recompute the rest. The scalars' gradient rides
    # on the last (synchronising) backward: DDP all-reduces only buckets whose every
    # parameter got a gradient in that backward.
    def backward_micro_batch(out: dict, j: int, shared_grads: dict) -> None:
        """Its feature-gradient slice, plus its own sample-loss term if there is one."""
        term = None
        if sample_loss is not None:
            with autocast():
                term = sample_loss(out, sample_total)
            sample_terms.append(term.detach())
            for key in sample_keys:  # CoCa's caption logits: its backward keeps what it
                out.pop(key, None)   # needs itself; no other reference outlives it
        _backward_slice(out, slices, j, shared_grads, scale(term) if term is not None else None)

    with _gradient_sync(model, enabled=False):
        backward_micro_batch(last_out, len(cached_inputs), {})
    del last_out
    with _frozen_norm_statistics(model):
        for j, inputs in enumerate(cached_inputs):
            rng_states[j].restore()
            is_last = j == len(cached_inputs) - 1
            with _gradient_sync(model, enabled=is_last):
                with autocast():
                    out = model(*move(_without(inputs, frozen_inputs)))  # frozen stay put
                backward_micro_batch(out, j, shared_grads if is_last else {})
    rng_after_pass1.restore()  # randomness continues as if nothing was replayed
    if sample_loss is not None:  # the global batch's value is the mean of the ranks' sums
        loss = loss + mean_over_ranks(torch.stack(sample_terms).sum())
    return loss


def _backward_slice(out: dict, slices: dict, j: int, shared_grads: dict,
                    sample_term: torch.Tensor | None = None) -> None:
    """Back-propagate micro-batch j's slice of the feature gradient (and the scalars'),
    together with its own sample-loss term."""
    pairs = [(out[k], g[j]) for k, g in slices.items()]
    pairs += [(out[k], g) for k, g in shared_grads.items()]
    if sample_term is not None:
        pairs.append((sample_term, torch.ones_like(sample_term)))
    pairs = [(t, g) for t, g in pairs if t is not None and t.requires_grad]  # frozen: no graph
    if pairs:
        tensors, grads = zip(*pairs)
        torch.autograd.backward(tensors, grads)


def _with_teacher(outputs: dict, teacher: Callable[..., dict] | None, inputs: MicroBatch) -> dict:
    """The model's outputs and, without grad, the teacher's on the same inputs."""
    if teacher is None:
        return outputs
    with torch.no_grad():
        extra = teacher(*inputs)
    if clash := outputs.keys() & extra.keys():
        raise ValueError(f"the teacher's outputs {sorted(clash)} clash with the model's: rename them")
    return {**outputs, **extra}


def _drop(outputs: dict, keys: set[str]) -> dict:
    return {k: v for k, v in outputs.items() if k not in keys}


def _without(inputs: MicroBatch, frozen: Sequence[int]) -> MicroBatch:
    if not frozen:  # the same object: a device copier may have prefetched it
        return inputs
    return [None if i in frozen else x for i, x in enumerate(inputs)]


def _is_per_sample(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 2


def _is_model_level(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim <= 1 and value.is_floating_point()


def _leaf(tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return tensor.requires_grad_(grad and tensor.is_floating_point())


def _batch_size(out: dict, per_sample_keys: list[str]) -> int:
    sizes = {out[k].shape[0] for k in per_sample_keys}
    if len(sizes) != 1:
        raise ValueError(f"model outputs {per_sample_keys} disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _cuda_devices(model: nn.Module, inputs: MicroBatch) -> list[int]:
    """Devices whose generators dropout may draw on: the model's and the (first) inputs'."""
    first_param = next(model.parameters(), None)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    devices = {t.device.index for t in tensors + [first_param] if t is not None and t.is_cuda}
    if devices and torch.cuda.is_available():
        devices.add(torch.cuda.current_device())  # modules may draw on the current device
    return sorted(devices)


class _RngState:
    """CPU and CUDA generator states; CPU matters on GPU too (open_clip's patch dropout)."""

    def __init__(self, cpu: torch.Tensor, cuda: dict[int, torch.Tensor]):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, cuda_devices: list[int]) -> "_RngState":
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def _frozen_norm_statistics(model: nn.Module):
    """Keep BatchNorm running statistics as pass 1 left them: recomputes must not move them."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    saved = [{name: buf.clone() for name, buf in m.named_buffers(recurse=False) if buf is not None}
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


def _gradient_sync(model: nn.Module, enabled: bool) -> ContextManager:
    """DDP and FSDP2 all-reduce gradients on every backward unless told not to."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DistributedDataParallel
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 fully_shard
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
