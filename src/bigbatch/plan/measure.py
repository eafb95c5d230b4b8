"""A's measurement without a GPU: one micro-batch's forward on fake tensors.

The model is built on the meta device (no memory, no compute), then materialised as fake
tensors (`FakeTensorMode`) on the device type it will train on, and one forward with
grad runs under the precision's autocast while bigbatch.memory's meter adds up the bytes
of every storage saved for backward, once each (parameters and the inputs excluded: they
are W and I). Plain meta tensors are not enough: autocast ignores them (everything stays
fp32) and their attention takes the math path, which saves (B, H, L, L) probabilities. A
CUDA target is modelled with CUDA's autocast policy (LayerNorm, norms in fp32), and
attention as the flash / memory-efficient kernels save it (q, k, v, output and a
(B, H, L) float32 log-sum-exp). Gradient checkpointing is derived from the same forward:
what runs outside the checkpointed blocks, plus every block's input (kept by
torch.utils.checkpoint), plus the largest block's activations (alive while that block is
recomputed in backward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from bigbatch.cross_entropy import chunk_rows
from bigbatch.device import AUTOCAST_DTYPES
from bigbatch.errors import COCA_STUDENT_WITH_TEACHER, SIGLIP_WITH_TEACHER, ConfigError
from bigbatch.inputs import normalize_on_device
from bigbatch.losses import CaptionLoss
from bigbatch.memory import MemoryMeter, storage_key, storage_keys
from bigbatch.patch_embedding import use_matmul_patch_embedding_on
from bigbatch.plan.formula import PlanOptions, Profile


def autocast_dtype(options: PlanOptions) -> torch.dtype | None:
    """The autocast dtype of the run (bigbatch.device's table); None for fp32 and for the
    precisions that cast the weights instead (weights_precision)."""
    return AUTOCAST_DTYPES.get(options.resolved_precision)


def weights_precision(options: PlanOptions) -> str:
    """How open_clip builds the weights: fp32, or cast (pure_bf16, pure_fp16, bf16, fp16)."""
    from bigbatch import model

    return model.weights_precision(options.resolved_precision)


@functools.lru_cache(maxsize=None)
def model_key(model_name: str, siglip: bool, force_patch_dropout: float | None,
              precision: str = "fp32") -> tuple:
    """What builds the model: (open_clip config name, siglip, force_patch_dropout, the
    weights' precision as open_clip takes it)."""
    from bigbatch.model import register_model_config  # open_clip is slow to import

    return register_model_config(model_name), siglip, force_patch_dropout, precision


def meta_profile(options: PlanOptions, batch_size: int) -> Profile:
    """The profile of one micro-batch, from a forward on fake tensors of the target's type."""
    key = model_key(options.model, options.siglip, options.force_patch_dropout, weights_precision(options))
    try:
        return fake_profile(key, options.target, autocast_dtype(options), batch_size)
    except (RuntimeError, NotImplementedError) as error:  # an op that fake tensors cannot run
        raise ConfigError(f"--model {options.model} could not be estimated on fake tensors "
                          f"({type(error).__name__}: {str(error).splitlines()[0]}): probe it "
                          f"on a GPU with --device cuda") from error


def with_teacher(profile: Profile, options: PlanOptions) -> Profile:
    """The profile with --distill-model's costs, from the teacher on fake tensors: its
    weights as the trainer loads them (in the run's weight precision), its two embeddings per
    sample at the student's feature element size (both come out of the same autocast), and
    the peak of its inference (linear in the batch: transformers)."""
    if options.distill_model is None:
        return profile
    check_distillation(options)
    from bigbatch.teacher import teacher_flags

    try:
        key = model_key(options.distill_model, False, None, weights_precision(options))
    except ConfigError as error:  # the loader names the student's flag
        raise ConfigError(teacher_flags(str(error))) from None
    try:
        weights, row, fixed, per_sample = teacher_costs(key, options.target, autocast_dtype(options))
    except (RuntimeError, NotImplementedError) as error:
        raise ConfigError(f"--distill-model {options.distill_model} could not be estimated on fake "
                          f"tensors ({type(error).__name__}: {str(error).splitlines()[0]})") from error
    return dataclasses.replace(profile, teacher_bytes=weights,
                               teacher_feature_bytes_per_sample=row * profile.feature_element_size,
                               teacher_inference_fixed_bytes=fixed,
                               teacher_inference_bytes_per_sample=per_sample)


def check_distillation(options: PlanOptions) -> None:
    """What training refuses with a teacher, refused here too (the same messages)."""
    import open_clip

    if options.siglip:
        raise ConfigError(SIGLIP_WITH_TEACHER)
    name = model_key(options.model, False, None)[0]
    if "multimodal_cfg" in (open_clip.get_model_config(name) or {}):
        raise ConfigError(COCA_STUDENT_WITH_TEACHER)


@functools.lru_cache(maxsize=8)
def teacher_costs(key: tuple, target: str, dtype: torch.dtype | None) -> tuple[int, int, int, int]:
    """(weight bytes, embedding elements per sample, inference peak: fixed bytes and bytes
    per sample) of a frozen model: forwards without grad at two batch sizes, every tensor
    they make counted while alive (autocast's weight casts among them: frozen weights are
    cast anew for each use, not cached)."""
    mode, net = fake_model(key, target)
    trainable = [p for p in net.parameters() if p.requires_grad]
    peaks = {}
    try:
        net.eval().requires_grad_(False)  # as the trainer's teacher (the fake model is shared: put back)
        for batch_size in (8, 16):
            with mode:
                inputs = fake_inputs(key, target, batch_size)
                meter = MemoryMeter(storage_keys(net, inputs))
                with _fused_attention(target == "cuda"), _autocast(target, dtype), torch.no_grad(), meter:
                    outputs = net(*inputs)
            peaks[batch_size] = meter.live.peak
    finally:
        net.train()
        for p in trainable:
            p.requires_grad_(True)
    per_sample = max(0, (peaks[16] - peaks[8]) // 8)
    row = sum(outputs[k].shape[-1] for k in ("image_features", "text_features"))
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    return weights, row, max(0, peaks[8] - 8 * per_sample), per_sample


def build(key: tuple, device: torch.device | str) -> nn.Module:
    """The open_clip model of `key` (random init), in training mode, as bigbatch.model builds it."""
    import open_clip

    from bigbatch.model import SIGLIP_INIT, hub_offline, hugging_face_error, unbuildable

    name, siglip, force_patch_dropout, precision = key
    kwargs: dict = dict(output_dict=True, precision=precision)
    if force_patch_dropout is not None:
        kwargs["force_patch_dropout"] = force_patch_dropout
    if siglip:
        kwargs.update(SIGLIP_INIT)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that a random init has no pretrained weights
    try:
        with hub_offline():
            net = open_clip.create_model(name, device=device, **kwargs).train()
    except Exception as error:
        if (hint := hugging_face_error(name, name, error) or unbuildable(name, error)) is not None:
            raise hint from None
        raise
    finally:
        root.setLevel(level)
    preprocess = open_clip.get_model_preprocess_cfg(net)
    normalize_on_device(net.visual, preprocess["mean"], preprocess["std"])  # uint8 inputs
    use_matmul_patch_embedding_on(net, device)
    return net


def input_shapes(key: tuple) -> tuple[tuple[int, int], int]:
    """(image height, width) and the text context length of the model's config."""
    import open_clip

    config = open_clip.get_model_config(key[0]) or {}
    size = config.get("vision_cfg", {}).get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return size, config.get("text_cfg", {}).get("context_length", 77)


@functools.lru_cache(maxsize=4)
def fake_model(key: tuple, target: str):
    """The model on the meta device (instant: no init compute), then as fake `target` tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        net = build(key, "meta")
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors
    with mode:
        net = net.to_empty(device=target)
    use_matmul_patch_embedding_on(net, target)  # as build() on a GPU, and training
    return mode, net


@functools.lru_cache(maxsize=64)
def fake_profile(key: tuple, target: str, dtype: torch.dtype | None, batch_size: int) -> Profile:
    """One forward of `batch_size` samples on fake tensors: what it saves for backward."""
    mode, net = fake_model(key, target)
    with mode:
        inputs = fake_inputs(key, target, batch_size)
        with _fused_attention(target == "cuda"), _autocast(target, dtype):
            saved = _saved_for_backward(net, inputs)
        return profile(net, batch_size, inputs, saved.outputs, activations=saved.full,
                       checkpointed=saved.checkpointed, checkpoint_kept=saved.kept)


def fake_inputs(key: tuple, target: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch as the loader gives it, uint8 images and token ids (under a fake mode)."""
    (height, width), context = input_shapes(key)
    images = torch.empty(batch_size, 3, height, width, dtype=torch.uint8, device=target)
    return images, torch.zeros(batch_size, context, dtype=torch.long, device=target)


def profile(net: nn.Module, batch_size: int, inputs, outputs: dict, **measured) -> Profile:
    """The model's sizes, the inputs' and features' per sample, and the measured activations."""
    features = [outputs[k] for k in ("image_features", "text_features") if outputs.get(k) is not None]
    return Profile(
        batch_size=batch_size,
        param_bytes=sum(p.numel() * p.element_size() for p in net.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in net.buffers()),
        trainable_bytes=sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad),
        largest_trainable_bytes=max((p.numel() * p.element_size() for p in net.parameters() if p.requires_grad),
                                    default=0),
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


def _saved_for_backward(model: nn.Module, inputs: tuple) -> _Saved:
    """Run `model(*inputs)` with grad and add up the storages saved for backward.

    Each saved storage is put down to the checkpointable block running when it was first
    saved (the meter's region), or to none, for the checkpointing estimate.
    """
    from bigbatch.model import transformer_blocks

    meter = MemoryMeter(storage_keys(model, inputs), track_live=False)
    block_inputs: dict = {}  # block index -> {storage: bytes} of its tensor arguments
    keep: list[torch.Tensor] = []  # storages are told apart by address: keep them alive

    def enter(index: int):
        def hook(module, args):
            meter.region = index
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            keep.extend(tensors)
            block_inputs[index] = {key: nbytes for key, nbytes in map(storage_key, tensors)
                                   if key is not None and key not in meter.exclude}
        return hook

    def leave(module, args, output):
        meter.region = None

    blocks = transformer_blocks(model)
    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave))]
    try:
        with torch.enable_grad(), meter:
            outputs = model(*inputs)
            alive = caption_backward(outputs, meter)
            owner = meter.saved.storages()  # storage -> (bytes, block index or None)
            del alive  # held until counted
    finally:
        for handle in handles:
            handle.remove()
    full = sum(size for size, _ in owner.values())
    if not blocks:  # nothing we know to be checkpointed
        return _Saved(full, full, full, dict(outputs))
    outside = {k: size for k, (size, block) in owner.items() if block is None}
    caption = sum(size for size, block in owner.values() if block == CAPTION)
    kept_inputs = {k: size for per_block in block_inputs.values() for k, size in per_block.items()}
    in_block = [sum(size for k, (size, block) in owner.items() if block == i and k not in block_inputs[i])
                for i in range(len(blocks)) if i in block_inputs]
    kept = sum({**outside, **kept_inputs}.values())
    # backward takes the caption loss first, then recomputes one block at a time: never both
    return _Saved(full, kept + max(in_block + [caption]), kept, dict(outputs))


CAPTION = "caption loss"  # the meter's region of CoCa's caption loss


def caption_backward(outputs: dict, meter: MemoryMeter) -> list:
    """CoCa's caption loss, as the engine runs it (bigbatch.cross_entropy): it saves the
    logits (B, T, vocab) and a float32 log-sum-exp per token; its backward makes the logits'
    gradient, in their dtype, and a float32 chunk of rows at a time. The term and those,
    held by the meter in the region CAPTION; nothing for a model without captions."""
    if not CaptionLoss.applies_to(outputs):
        return []
    caption = CaptionLoss()
    logits = outputs["logits"]
    rows, vocab = logits.shape[0] * logits.shape[1], logits.shape[2]
    chunk = (min(rows, chunk_rows(vocab)), vocab)
    meter.region = CAPTION  # its storages apart: with checkpointing, they never meet a block's
    try:
        term = caption(outputs, caption.count(outputs))  # saves the logits
        gradient = meter.hold(torch.empty(logits.shape, dtype=logits.dtype, device=logits.device))
        return [term, gradient, meter.hold(torch.empty(chunk, dtype=torch.float32, device=logits.device))]
    finally:
        meter.region = None


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
