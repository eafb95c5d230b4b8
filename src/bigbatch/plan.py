"""Memory planner: which micro-batch fits a GPU, and the peak memory of a training step.

`bigbatch plan` (and `--batch-size auto`) predict the peak GPU memory of one optimizer
step of `cached_backward` and pick the largest micro-batch that fits. The prediction
follows the step's phases (DESIGN.md §2); all sizes are per rank, in bytes:

    W  weights (parameters and buffers, fp32: autocast keeps fp32 master weights)
    G  gradients, fp32 per trainable parameter (under DDP they are views into its
       all-reduce buckets: gradient_as_bucket_view, no second copy)
    O  AdamW state, two fp32 moments per trainable parameter (frozen ones have none)
    I  the step's inputs on the device: all K micro-batches (uint8 images, normalised
       by the image tower's first op; int64 tokens); one micro-batch with --offload-inputs
       (two while the next one's copy overlaps the forward)
    A  activations of ONE micro-batch: the tensors its forward saves for backward
       (autocast's low-precision weight copies included)
    F  the rank's cached features, n = b x K rows of (D_image + D_text): concatenated into
       leaves (the micro-batches' outputs are freed then), and their gradients (F_grad)
    L  the loss's working set (`bigbatch.tiled.loss_working_set_bytes`): logits (blocks),
       float32 accumulators, plus the all-gathered features across ranks; a tiled loss's
       float32 accumulators become F_grad, so they are counted there, once

1. Pass 1 embeds K - 1 micro-batches without grad (a few layers' outputs at a time) and
   the last one with grad: its graph, A, stays alive through the loss.
2. The loss runs once over the cached features. `optimizer.zero_grad(set_to_none=True)`
   left no gradients yet:            W + O + I + A + F + F_grad + L
3. Pass 2 back-propagates the kept graph, then recomputes each micro-batch; the logits
   are gone, the gradients have arrived:   W + O + I + A + F_grad + G + T
   where T is the largest parameter's gradient, made apart before it is added to .grad
   (K = 1 on one process: backward frees the activations as the gradients arrive, one
   tower after the other: W + O + I + max(A, G + A / 2))
4. The step (fused AdamW, in place; clipping scales in place): W + O + I + G, below phase 3

    peak = W + O + I + max(A + F + F_grad + L,  A + F_grad + G + T)

With K = 1 nothing is cached (F = 0) and the loss runs on the graph's own outputs.
Backward's transients (a layer's input gradients), the CUDA context and the allocator's
fragmentation are not in the formula: a plan must fit `gpu_memory x (1 - reserve)`.
Nor is a distillation teacher (--distill-model): its weights, one micro-batch's inference
and its cached features (N x its embed dim, twice) come on top of the plan.

How A is measured, without a GPU: the model is built on the meta device (no memory,
no compute), then materialised as fake tensors (`FakeTensorMode`) on the device type
it will train on, and one forward with grad runs under the precision's autocast while
`torch.autograd.graph.saved_tensors_hooks` adds up the bytes of every storage saved
for backward, once each (parameters and the inputs excluded: they are W and I). Plain
meta tensors are not enough: autocast ignores them (everything stays fp32) and their
attention takes the math path, which saves (B, H, L, L) probabilities. A CUDA target is
modelled with CUDA's autocast policy (LayerNorm, norms in fp32), and attention as the
flash / memory-efficient kernels save it (q, k, v, output and a (B, H, L) float32
log-sum-exp). Gradient checkpointing is derived from the same forward: what runs outside
the checkpointed blocks, plus every block's input (kept by torch.utils.checkpoint), plus
the largest block's activations (alive while that block is recomputed in backward).

On a CUDA device (`device="cuda"`) A is a real probe instead: one micro-batch forward and
backward, `torch.cuda.max_memory_allocated` above the model, its gradients and the inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.inputs import normalize_on_device
from bigbatch.losses import CaptionLoss, create_loss
from bigbatch.tiled import loss_working_set_bytes

GiB = 1024 ** 3
FLOAT32 = 4
PRECISIONS = {"fp32": None, "amp": torch.float16, "amp_bf16": torch.bfloat16}
DEFAULT_RESERVE = 0.10  # of the GPU: CUDA context, allocator fragmentation, backward transients
BLOCK_LISTS = ("resblocks", "blocks", "layer", "layers")  # where towers keep checkpointed blocks


@dataclass
class MemoryPlan:
    """Predicted per-rank memory of one optimizer step; sizes in bytes (see module docstring)."""

    model: str
    batch_size: int            # micro-batch per rank, b
    accum_freq: int            # micro-batches per step, K
    world_size: int            # W
    global_batch_size: int     # b x K x W
    precision: str
    grad_checkpointing: bool
    weights: int               # W
    gradients: int             # G
    gradient_transient: int    # T: the largest gradient, made apart before it joins .grad
    optimizer_state: int       # O
    inputs: int                # I
    activations: int           # A, one micro-batch
    cached_features: int       # F + F_grad (0 when K = 1)
    loss_working_set: int      # L
    peak: int
    phase: str                 # where the peak is: "loss" or "pass 2"
    source: str                # "meta estimate" or "probe on cuda"
    target: str = "cuda"       # the device type modelled
    offload_inputs: bool = False
    local_loss: bool = True
    loss_tile: int | None = None
    activations_checkpointed: int | None = None  # A with --grad-checkpointing, when known
    gpu_memory: int | None = None
    reserve: float = DEFAULT_RESERVE

    @property
    def usable_memory(self) -> int | None:
        return None if self.gpu_memory is None else int(self.gpu_memory * (1 - self.reserve))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak <= self.usable_memory


# --- batch arithmetic and flags

def derive_accum_freq(global_batch_size: int, batch_size: int, world_size: int = 1) -> int:
    """K = G / (b x W); a ConfigError naming micro-batch sizes that divide if it does not."""
    for name, value in (("global-batch-size", global_batch_size), ("batch-size", batch_size),
                        ("world-size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if global_batch_size % world_size:
        raise ConfigError(f"--global-batch-size {global_batch_size} does not split over --world-size "
                          f"{world_size}: use a global batch that is a multiple of {world_size}")
    per_rank = global_batch_size // world_size
    if per_rank % batch_size:
        near = _nearest_divisors(per_rank, batch_size)
        options = " or ".join(f"{d} (accum-freq {per_rank // d})" for d in near)
        raise ConfigError(f"--global-batch-size {global_batch_size} is not a whole number of "
                          f"--batch-size {batch_size} x --world-size {world_size} micro-batches: "
                          f"use a --batch-size that divides {per_rank}, e.g. {options}")
    return per_rank // batch_size


def _nearest_divisors(n: int, b: int) -> list[int]:
    """The divisors of n just below and just above b."""
    divisors = _divisors(n)
    below = [d for d in divisors if d < b]
    above = [d for d in divisors if d > b]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_memory(text: str | int) -> int:
    """'24GiB', '80GB', '512MiB', '24G' (binary, like nvidia-smi and SLURM) -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        hint = " (add a unit)" if match and not unit else ""
        raise ConfigError(f"--gpu-memory {text!r}: write a size with a unit{hint}, "
                          f"e.g. 24GiB, 80GB or 512MiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ConfigError(f"--gpu-memory {text!r} must be more than zero")
    return value


def _autocast_dtype(precision: str, target: str) -> torch.dtype | None:
    if precision == "auto":  # as TrainConfig.resolved_precision
        precision = "amp" if target == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


# --- the estimate

@dataclass(frozen=True)
class _Profile:
    """What the model and one micro-batch of `batch_size` cost; independent of K and W."""

    batch_size: int
    param_bytes: int
    buffer_bytes: int
    trainable_params: int
    largest_trainable_param: int   # elements of the largest trainable tensor (T = its gradient)
    input_bytes_per_sample: int    # uint8 images + int64 tokens
    feature_bytes_per_sample: int  # (D_image + D_text) x the features' element size
    feature_element_size: int      # 4: float32 features (open_clip normalises them in fp32)
    embed_dim: int
    activations: int | None        # saved for backward (probe: peak above the fixed costs)
    checkpointed: int | None       # the same with grad checkpointing (None: not measured)
    checkpoint_kept: int | None = None  # checkpointed: saved outside the blocks + block inputs


@dataclass(frozen=True)
class _Options:
    """A plan's settings other than the micro-batch and accum-freq."""

    model: str
    world_size: int
    precision: str
    grad_checkpointing: bool
    local_loss: bool
    tile: int | None
    siglip: bool
    offload_inputs: bool
    target: str
    source: str
    gpu_memory: int | None
    reserve: float


def estimate_memory(model_name: str, *, batch_size: int, accum_freq: int, world_size: int = 1,
                    precision: str = "amp_bf16", grad_checkpointing: bool = False,
                    local_loss: bool = True, tile: int | None = None, device: str = "cpu",
                    siglip: bool = False, offload_inputs: bool = False,
                    force_patch_dropout: float | None = None, target: str | None = None,
                    gpu_memory: int | None = None, reserve: float = DEFAULT_RESERVE) -> MemoryPlan:
    """The per-rank memory plan of one step of b x K x W samples (formula: module docstring).

    device: where to estimate: "cpu" (or "meta") builds the model on the meta device and
        runs it on fake tensors, no memory and no compute; "cuda" / "cuda:N" probes one
        micro-batch for real on that GPU.
    target: the device type the run will train on, "cuda" unless told ("cpu" models CPU
        autocast and CPU attention kernels, as a CPU run or measurement has them).
    local_loss: with world_size > 1, --local-loss --gather-with-grad (this rank's rows
        against all columns); otherwise every rank takes the whole (N, N) loss.
    tile: the loss's tile_size (None: the loss's default, which tiles only large batches).
    gpu_memory, reserve: recorded in the plan, for `fits` and `format_plan`.
    """
    for name, value in (("batch-size", batch_size), ("accum-freq", accum_freq), ("world-size", world_size)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    probe = str(device).startswith("cuda")
    target = target or "cuda"
    dtype = _autocast_dtype(precision, target)
    key = _model_key(model_name, siglip, force_patch_dropout)
    if probe:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device here; use --device cpu for a "
                              f"meta estimate (it needs no GPU)")
        try:
            profile = _probe_cuda(key, batch_size, dtype, grad_checkpointing, torch.device(device))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise ConfigError(f"--batch-size {batch_size} ran out of GPU memory in the probe: lower "
                              f"--batch-size and raise --accum-freq (or --batch-size auto)") from None
    else:
        profile = _meta_profile(model_name, key, target, dtype, batch_size)
    options = _Options(model_name, world_size, precision, grad_checkpointing, local_loss, tile,
                       siglip, offload_inputs, target, "probe on cuda" if probe else "meta estimate",
                       gpu_memory, reserve)
    activations = profile.checkpointed if grad_checkpointing else profile.activations
    return _assemble(profile, activations, batch_size, accum_freq, options)


def _assemble(profile: _Profile, activations: int, b: int, K: int, o: _Options) -> MemoryPlan:
    """The peak formula of the module docstring, term by term."""
    W, n = o.world_size, b * K  # n: this rank's samples in the step
    trainable = profile.trainable_params
    weights = profile.param_bytes + profile.buffer_bytes
    gradients = FLOAT32 * trainable  # DDP: views into its buckets (gradient_as_bucket_view)
    optimizer_state = 2 * FLOAT32 * trainable
    inputs = (min(2 * b, n) if o.offload_inputs else n) * profile.input_bytes_per_sample
    row = profile.feature_bytes_per_sample
    feature_grads = row * n if K > 1 else 0
    cached = row * n + feature_grads if K > 1 else 0
    loss_ws, loss_tile = _loss_working_set(n, W, o.local_loss, profile.embed_dim, row, o.tile, o.siglip)
    if loss_tile is not None and profile.feature_element_size == FLOAT32:
        # the tiled loss's float32 gradient accumulators become the features' gradients
        loss_ws = max(0, loss_ws - feature_grads)
    # pass 2: the gradients arrive while the activations are freed. With K > 1 they are all
    # there while later micro-batches are recomputed, each new gradient made apart before it
    # is added to .grad (the largest: T); DDP's buckets exist from the start. A plain step on
    # one process: the towers run backward one after the other, so about one tower's
    # activations can outlive the other's gradients
    transient = 0 if K == 1 and W == 1 else FLOAT32 * profile.largest_trainable_param
    if K == 1 and W == 1:
        pass_2 = max(activations, gradients + activations // 2)
    else:
        pass_2 = activations + gradients + transient
    phases = {"loss": activations + cached + loss_ws, "pass 2": pass_2 + feature_grads}
    phase = max(phases, key=phases.get)
    return MemoryPlan(
        model=o.model, batch_size=b, accum_freq=K, world_size=W, global_batch_size=n * W,
        precision=o.precision, grad_checkpointing=o.grad_checkpointing, weights=weights,
        gradients=gradients, gradient_transient=transient, optimizer_state=optimizer_state,
        inputs=inputs, activations=activations,
        cached_features=cached, loss_working_set=loss_ws,
        peak=weights + optimizer_state + inputs + phases[phase], phase=phase, source=o.source,
        target=o.target, offload_inputs=o.offload_inputs, local_loss=o.local_loss,
        loss_tile=loss_tile, activations_checkpointed=profile.checkpointed, gpu_memory=o.gpu_memory,
        reserve=o.reserve)


def _loss_working_set(n: int, world_size: int, local_loss: bool, dim: int, row_bytes: int,
                      tile: int | None, siglip: bool) -> tuple[int, int | None]:
    """The loss's bytes beyond the cached features, and its tile (None: the plain loss).

    Rows are this rank's n samples under --local-loss, else all N = n x W. Across ranks
    the features are all-gathered first: (n, D_i + D_t) concatenated, then (N, D_i + D_t).
    """
    N = n * world_size
    local = local_loss and world_size > 1
    rows = n if local else N
    name = "siglip" if siglip else "clip"
    loss = create_loss(name, local_loss=local, gather_with_grad=local, world_size=world_size,
                       tile_size=tile)
    block = loss.tile(rows, N)  # the loss's own rule: tile_size, or tile only large batches
    working = loss_working_set_bytes(rows, N, dim, tile=block, tiled=block is not None, loss=name)
    gathered = row_bytes * (n + N) if world_size > 1 else 0
    return working + gathered, block


def find_max_batch_size(model_name: str, *, gpu_memory_bytes: int, accum_freq: int | None = None,
                        global_batch_size: int | None = None, world_size: int = 1,
                        precision: str = "amp_bf16", grad_checkpointing: bool = False,
                        local_loss: bool = True, tile: int | None = None, device: str = "cpu",
                        siglip: bool = False, offload_inputs: bool = False,
                        force_patch_dropout: float | None = None, target: str | None = None,
                        reserve: float = DEFAULT_RESERVE, max_batch_size: int = 1 << 16,
                        confirm: bool = True) -> int:
    """The largest micro-batch whose predicted peak fits in `gpu_memory_bytes x (1 - reserve)`.

    With `global_batch_size` only micro-batches that divide G / world_size are candidates,
    each with its own accum_freq (`derive_accum_freq`); otherwise accum_freq stays fixed
    (default 1). The peak grows with the micro-batch, so this is a binary search. Its
    activations come from a line a + c x b through two meta forwards (exact for
    transformers), and the answer is checked with a meta forward at its own size. On
    CUDA with `confirm`, the answer is then probed for real, stepping down on OOM.
    Raises ConfigError, naming the fixes, when not even the smallest candidate fits.
    """
    if global_batch_size is not None:
        if global_batch_size % world_size:
            derive_accum_freq(global_batch_size, 1, world_size)  # raises, naming the fix
        candidates = [d for d in _divisors(global_batch_size // world_size) if d <= max_batch_size]
    else:
        candidates = list(range(1, max_batch_size + 1))

    def accum(b: int) -> int:
        if global_batch_size is None:
            return accum_freq or 1
        return global_batch_size // (world_size * b)

    settings = dict(world_size=world_size, precision=precision, grad_checkpointing=grad_checkpointing,
                    local_loss=local_loss, tile=tile, siglip=siglip, offload_inputs=offload_inputs,
                    force_patch_dropout=force_patch_dropout, target=target,
                    gpu_memory=gpu_memory_bytes, reserve=reserve)
    exact = functools.partial(estimate_memory, model_name, device="cpu", **settings)
    usable = gpu_memory_bytes * (1 - reserve)

    target_type = target or "cuda"
    key = _model_key(model_name, siglip, force_patch_dropout)
    dtype = _autocast_dtype(precision, target_type)
    (b1, p1), (b2, p2) = [(b, _meta_profile(model_name, key, target_type, dtype, b)) for b in (8, 16)]
    field = "checkpointed" if grad_checkpointing else "activations"
    slope = (getattr(p2, field) - getattr(p1, field)) / (b2 - b1)
    intercept = getattr(p1, field) - slope * b1
    options = _Options(model_name, world_size, precision, grad_checkpointing, local_loss, tile,
                       siglip, offload_inputs, target_type, "meta estimate", gpu_memory_bytes, reserve)

    def fits(i: int) -> bool:
        b = candidates[i]
        return _assemble(p1, int(intercept + slope * b), b, accum(b), options).peak <= usable

    lo, hi, best = 0, len(candidates) - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    while best >= 0 and exact(batch_size=candidates[best], accum_freq=accum(candidates[best])).peak > usable:
        best -= 1  # the line was optimistic at this size
    if best < 0:
        b = candidates[0]
        raise ConfigError(no_fit_message(exact(batch_size=b, accum_freq=accum(b))))
    if confirm and str(device).startswith("cuda") and torch.cuda.is_available():
        while best >= 0:
            b = candidates[best]
            try:
                plan = estimate_memory(model_name, batch_size=b, accum_freq=accum(b), device=device,
                                       **settings)
                if plan.peak <= usable:
                    break
            except ConfigError:  # the probe ran out of memory
                pass
            best -= 1
        if best < 0:
            raise ConfigError(f"no micro-batch of {model_name} fits {_gib(gpu_memory_bytes)} GiB "
                              f"when probed on {device}: see `bigbatch plan` for the fixes")
    return candidates[best]


def inputs_must_wait_on_host(model_name: str, *, gpu_memory: int, **options) -> MemoryPlan | None:
    """Whether --offload-inputs is needed: the plan with all K micro-batches' inputs on the GPU
    when it does not fit in `gpu_memory` but the offloaded one does (None otherwise).
    `options`: estimate_memory's (batch_size, accum_freq, world_size, precision, ...)."""
    on_device = estimate_memory(model_name, gpu_memory=gpu_memory, **options)
    if on_device.fits or on_device.accum_freq == 1:
        return None
    offloaded = estimate_memory(model_name, gpu_memory=gpu_memory, **{**options, "offload_inputs": True})
    return on_device if offloaded.fits else None


def no_fit_message(plan: MemoryPlan) -> str:
    """One message: what does not fit, and what to change."""
    what = (f"--model {plan.model} does not fit {_gib(plan.gpu_memory)} GiB "
            f"({_gib(plan.usable_memory)} GiB usable, {plan.reserve:.0%} kept in reserve) even at "
            f"--batch-size {plan.batch_size}: it needs {_gib(plan.peak)} GiB")
    return what + ". Fixes: " + "; ".join(suggestions(plan))


def suggestions(plan: MemoryPlan) -> list[str]:
    """What to change, biggest saving first, for a plan that does not fit."""
    fixed = plan.weights + plan.optimizer_state + plan.gradients
    found: list[tuple[int, str]] = []
    if not plan.offload_inputs and plan.accum_freq > 1:
        saving = plan.inputs - plan.inputs // plan.accum_freq
        found.append((saving, f"--offload-inputs (the step's {plan.accum_freq} micro-batches of "
                              f"inputs take {_gib(plan.inputs)} GiB on the GPU)"))
    if not plan.grad_checkpointing:
        ckpt = plan.activations_checkpointed
        saving = plan.activations - ckpt if ckpt is not None else plan.activations // 2
        detail = f" (activations {_gib(plan.activations)} -> {_gib(ckpt)} GiB)" if ckpt is not None else ""
        found.append((saving, f"--grad-checkpointing{detail}"))
    if plan.batch_size > 1:
        found.append((plan.activations // 2, "a lower --batch-size with a higher --accum-freq "
                                             "(activations scale with the micro-batch; the "
                                             "gradient is the same)"))
    if plan.world_size > 1 and not plan.local_loss:
        found.append((plan.loss_working_set // 2, "--local-loss --gather-with-grad (each rank "
                                                  "takes only its own rows of the loss)"))
    found.append(((plan.inputs + plan.cached_features) // 2, "more GPUs (--world-size): the global batch, "
                                                      "its inputs and cached features are split "
                                                      "over them"))
    if fixed > (plan.usable_memory or fixed):
        found.append((fixed, f"weights, gradients and AdamW state alone take {_gib(fixed)} GiB: "
                             f"shard them over GPUs with --fsdp, or lock a tower"))
    return [text for _, text in sorted(found, key=lambda item: -item[0])]


# --- measuring one micro-batch: fake tensors (no GPU) or a CUDA probe

@functools.lru_cache(maxsize=None)
def _model_key(model_name: str, siglip: bool, force_patch_dropout: float | None) -> tuple:
    from bigbatch.model import register_model_config  # open_clip is slow to import

    return register_model_config(model_name), siglip, force_patch_dropout


def _meta_profile(model_name: str, key: tuple, target: str, dtype: torch.dtype | None,
                  batch_size: int) -> _Profile:
    try:
        return _fake_profile(key, target, dtype, batch_size)
    except (RuntimeError, NotImplementedError) as error:  # an op that fake tensors cannot run
        raise ConfigError(f"--model {model_name} could not be estimated on fake tensors "
                          f"({type(error).__name__}: {str(error).splitlines()[0]}): probe it "
                          f"on a GPU with --device cuda") from error


def _build(key: tuple, device: torch.device | str) -> nn.Module:
    """The open_clip model of `key` (random init), in training mode, as bigbatch.model builds it."""
    import open_clip

    name, siglip, force_patch_dropout = key
    kwargs: dict = dict(output_dict=True)
    if force_patch_dropout is not None:
        kwargs["force_patch_dropout"] = force_patch_dropout
    if siglip:  # as bigbatch.model.create_model
        kwargs.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that a random init has no pretrained weights
    try:
        net = open_clip.create_model(name, device=device, **kwargs).train()
    finally:
        root.setLevel(level)
    preprocess = open_clip.get_model_preprocess_cfg(net)
    normalize_on_device(net.visual, preprocess["mean"], preprocess["std"])  # uint8 inputs
    return net


def _input_shapes(key: tuple) -> tuple[tuple[int, int], int]:
    """(image height, width) and the text context length of the model's config."""
    import open_clip

    config = open_clip.get_model_config(key[0]) or {}
    size = config.get("vision_cfg", {}).get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return size, config.get("text_cfg", {}).get("context_length", 77)


@functools.lru_cache(maxsize=4)
def _fake_model(key: tuple, target: str):
    """The model on the meta device (instant: no init compute), then as fake `target` tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        net = _build(key, "meta")
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors
    with mode:
        net = net.to_empty(device=target)
    return mode, net


@functools.lru_cache(maxsize=64)
def _fake_profile(key: tuple, target: str, dtype: torch.dtype | None, batch_size: int) -> _Profile:
    """One forward of `batch_size` samples on fake tensors: what it saves for backward."""
    mode, net = _fake_model(key, target)
    (height, width), context = _input_shapes(key)
    with mode:
        images = torch.empty(batch_size, 3, height, width, dtype=torch.uint8, device=target)
        texts = torch.zeros(batch_size, context, dtype=torch.long, device=target)
        with _fused_attention(target == "cuda"), _autocast(target, dtype):
            saved = _saved_bytes(net, (images, texts))
        return _profile(net, batch_size, (images, texts), saved.outputs, activations=saved.full,
                        checkpointed=saved.checkpointed, checkpoint_kept=saved.kept)


def _profile(net: nn.Module, batch_size: int, inputs, outputs: dict, **measured) -> _Profile:
    features = [outputs[k] for k in ("image_features", "text_features") if outputs.get(k) is not None]
    return _Profile(
        batch_size=batch_size,
        param_bytes=sum(p.numel() * p.element_size() for p in net.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in net.buffers()),
        trainable_params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        largest_trainable_param=max((p.numel() for p in net.parameters() if p.requires_grad), default=0),
        input_bytes_per_sample=sum(t[0].numel() * t.element_size() for t in inputs),
        feature_bytes_per_sample=sum(f.shape[-1] * f.element_size() for f in features),
        feature_element_size=max(f.element_size() for f in features),
        embed_dim=max(f.shape[-1] for f in features), **measured)


@dataclass
class _Saved:
    full: int          # every storage saved for backward, once
    checkpointed: int  # outside the blocks + the blocks' inputs + the largest block
    kept: int          # checkpointed, kept from forward to backward: outside + block inputs
    outputs: dict


def _saved_bytes(model: nn.Module, inputs: tuple) -> _Saved:
    """Run `model(*inputs)` with grad and add up the storages saved for backward.

    Each storage counts once, whatever the views of it that are saved; the model's
    parameters and buffers and the inputs do not count (they are weights and inputs).
    Each saved storage is put down to the checkpointable block running when it was first
    saved, or to none, for the checkpointing estimate.
    """
    exclude = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *inputs]}
    owner: dict = {}        # storage -> (bytes, block index or None)
    block_inputs: dict = {}  # block index -> {storage: bytes} of its tensor arguments
    running: list[int] = []
    keep: list[torch.Tensor] = []  # storages are told apart by address: keep them alive

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in exclude and key not in owner:
            owner[key] = (_storage_bytes(t), running[-1] if running else None)
        return t

    def enter(index: int):
        def hook(module, args):
            running.append(index)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            keep.extend(tensors)
            block_inputs[index] = {_storage_key(t): _storage_bytes(t) for t in tensors
                                   if _storage_key(t) not in exclude}
        return hook

    def leave(module, args, output):
        running.pop()

    blocks = _checkpoint_blocks(model)
    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave))]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = model(*inputs)
            caption = CaptionLoss()
            if set(caption.keys) <= outputs.keys():  # CoCa: its caption logits (B, T, vocab) live
                pack(outputs["logits"])  # until their loss's backward, which saves log-probs too
                caption(outputs, caption.count(outputs))
    finally:
        for handle in handles:
            handle.remove()
    full = sum(size for size, _ in owner.values())
    outside = {k: size for k, (size, block) in owner.items() if block is None}
    kept_inputs = {k: size for per_block in block_inputs.values() for k, size in per_block.items()}
    in_block = [sum(size for k, (size, block) in owner.items() if block == i and k not in block_inputs[i])
                for i in range(len(blocks)) if i in block_inputs]
    kept = sum({**outside, **kept_inputs}.values())
    if not blocks:  # nothing we know to be checkpointed
        return _Saved(full, full, full, dict(outputs))
    return _Saved(full, kept + max(in_block, default=0), kept, dict(outputs))


def _checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks grad checkpointing recomputes: members of a tower's block list
    (open_clip's `resblocks`, timm's `blocks`, Hugging Face's `layer`), outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in BLOCK_LISTS and parts[-1].isdigit():
            if not any(name.startswith(outer + ".") for outer, _ in found):
                found.append((name, module))
    return [module for _, module in found]


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # no storage (e.g. sparse)
        return id(t)


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):
        return t.numel() * t.element_size()


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast's state, set by hand: `torch.autocast("cuda")` turns itself off on a
    machine without a GPU, and fake CUDA tensors need CUDA's autocast policy."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, enabled)
        torch.set_autocast_dtype(device_type, previous)


class _FusedAttentionShapes(torch.autograd.Function):
    """What CUDA's flash / memory-efficient attention keep for backward, on fake tensors:
    q, k, v, the output and a (B, H, L) float32 log-sum-exp. Shapes only: never real data.
    The output takes the query's memory layout, as the kernels' `empty_like(q)` does: after
    nn.MultiheadAttention's head permutes it is then contiguous, a view rather than a copy."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    if torch.is_autocast_enabled(query.device.type):  # SDPA runs in the autocast dtype
        low = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(low) for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(low)
    return _FusedAttentionShapes.apply(query, key, value, attn_mask)


@contextlib.contextmanager
def _fused_attention(enabled: bool) -> Iterator[None]:
    """On fake CUDA tensors SDPA would take the math path (saving (B, H, L, L) probabilities);
    a GPU takes a fused kernel. nn.MultiheadAttention, open_clip and timm all call
    torch.nn.functional.scaled_dot_product_attention, so that is the one name to swap."""
    if not enabled:
        yield
        return
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _probe_cuda(key: tuple, batch_size: int, dtype: torch.dtype | None, grad_checkpointing: bool,
                device: torch.device) -> _Profile:
    """One real micro-batch forward + backward on the GPU.

    The weights are measured as the model is built. The model and its gradients (allocated
    up front, as after the first backward) are the baseline; the inputs are allocated before the peak counter is reset, so the activations
    are `max_memory_allocated` above all of them: the saved tensors and backward's transients.
    """
    torch.cuda.synchronize(device)
    empty = torch.cuda.memory_allocated(device)
    net = _build(key, device)
    weights = torch.cuda.memory_allocated(device) - empty  # measured: the allocator's rounding too
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    (height, width), context = _input_shapes(key)
    try:
        for p in net.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, device=device)
        texts = torch.randint(1, 1000, (batch_size, context), device=device)
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        autocast = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            outputs = net(images, texts)
        shapes = {k: v.detach() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        loss = sum(v.float().sum() for k, v in outputs.items() if k.endswith("_features"))
        loss.backward()
        del outputs, loss
        torch.cuda.synchronize(device)
        activations = torch.cuda.max_memory_allocated(device) - baseline
        measured = {"checkpointed" if grad_checkpointing else "activations": activations}
        measured.setdefault("activations", None)
        measured.setdefault("checkpointed", None)
        profile = _profile(net, batch_size, (images, texts), shapes, **measured)
        return dataclasses.replace(profile, param_bytes=weights - profile.buffer_bytes)
    finally:
        del net
        torch.cuda.empty_cache()


def measure_peak(model_name: str, *, batch_size: int, accum_freq: int, precision: str = "fp32",
                 grad_checkpointing: bool = False, offload_inputs: bool = False,
                 device: str = "cpu", seed: int = 0, reuse_inputs: bool = False) -> tuple[int, float]:
    """The peak a plan predicts, measured: bytes over one real training step (the trainer's
    inputs, engine, loss and fused AdamW step, on random uint8 images and token ids), after
    a one-micro-batch step that made the optimizer state; and that step's seconds.
    CUDA: max_memory_allocated; CPU: bigbatch.memory's meter (see step_peak_bytes).
    reuse_inputs: one host micro-batch K times (huge K: host memory and time to make them);
    the device still holds K copies."""
    import time

    from bigbatch.accumulation import cached_backward
    from bigbatch.device import autocast_factory
    from bigbatch.inputs import input_bytes
    from bigbatch.memory import step_peak_bytes
    from bigbatch.model import create_model, parameter_groups
    from bigbatch.build import adamw
    from bigbatch.step import optimizer_step, step_inputs, unscale_and_clip

    device = torch.device(device)
    torch.manual_seed(seed)
    net = create_model(model_name, grad_checkpointing=grad_checkpointing, device=device).model
    optimizer = adamw(parameter_groups(net, 0.2), lr=1e-5)
    autocast = autocast_factory(precision, device)
    loss_fn = create_loss("clip")
    (height, width), context = _input_shapes(_model_key(model_name, False, None))
    generator = torch.Generator().manual_seed(seed)

    def micro_batch():  # as the loader gives it: uint8 images, pinned for a GPU
        images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator)
        texts = torch.randint(1, 1000, (batch_size, context), generator=generator)
        pin = device.type == "cuda"
        return _MicroBatch(images.pin_memory() if pin else images, texts.pin_memory() if pin else texts)

    def step(batches: list) -> None:
        inputs, to_device = step_inputs(batches, device, offload_inputs)
        cached_backward(net, inputs, loss_fn, autocast=autocast, to_device=to_device)
        unscale_and_clip(net, optimizer, None, clip_norm=1.0)
        optimizer_step(net, optimizer, None)

    step([micro_batch()])
    # made before the step: not in its time
    batches = [micro_batch()] * accum_freq if reuse_inputs else [micro_batch() for _ in range(accum_freq)]
    start = time.perf_counter()
    peak = step_peak_bytes(lambda: step(batches), net, optimizer, device=device)
    seconds = time.perf_counter() - start
    on_host = device.type == "cpu"  # then the inputs are "on the device" all along: count them
    return peak + (input_bytes([(b.images, b.texts) for b in batches]) if on_host else 0), seconds


@dataclass
class _MicroBatch:
    images: torch.Tensor
    texts: torch.Tensor


# --- output and command line

def _gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """A table of the plan in GiB: each term, the peak and, if it does not fit, the fixes."""
    K, W = plan.accum_freq, plan.world_size
    ckpt = "with" if plan.grad_checkpointing else "without"
    lines = [
        f"{plan.model}, {plan.precision}, {ckpt} grad checkpointing ({plan.source}, for {plan.target})",
        f"global batch {plan.global_batch_size} = batch-size {plan.batch_size} x accum-freq {K} "
        f"x world-size {W}",
        "",
        f"{'per GPU':<50}{'GiB':>8}",
    ]
    rows = [
        ("weights", plan.weights),
        ("gradients (fp32)", plan.gradients),
        ("a new gradient before it joins .grad (the largest)", plan.gradient_transient),
        ("optimizer state (AdamW, 2 fp32 moments)", plan.optimizer_state),
        (f"inputs ({'offloaded: 2 micro-batches at most' if plan.offload_inputs and K > 1 else '1 micro-batch' if K == 1 else f'{K} micro-batches'})",
         plan.inputs),
        (f"activations (1 micro-batch of {plan.batch_size})", plan.activations),
        (f"cached features ({plan.batch_size * K} rows, + grads)", plan.cached_features),
        (f"loss working set ({'tiles of ' + str(plan.loss_tile) if plan.loss_tile else 'plain logits'})",
         plan.loss_working_set),
    ]
    lines += [f"  {name:<48}{_gib(size):>8}" for name, size in rows]
    lines.append("-" * 58)
    lines.append(f"{'peak (' + plan.phase + ' phase)':<50}{_gib(plan.peak):>8}")
    lines.append("  = weights + optimizer + inputs + max(activations + cached + loss,")
    lines.append("    activations + feature grads + gradients)")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {_gib(plan.gpu_memory)} GiB ({_gib(plan.usable_memory)} GiB usable, "
                     f"{plan.reserve:.0%} reserve for the CUDA context, fragmentation, transients)")
        if not plan.fits:
            lines.append("to fit, try:")
            lines += [f"  - {text}" for text in suggestions(plan)]
    return "\n".join(lines)
