"""A's measurement on a GPU (`--device cuda`): one real micro-batch forward and backward,
`torch.cuda.max_memory_allocated` above the model, its gradients and the inputs."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from bigbatch.errors import ConfigError
from bigbatch.losses import CaptionLoss
from bigbatch.plan.formula import PlanOptions, Profile
from bigbatch.plan.measure import autocast_dtype, build, input_shapes, model_key, profile, weights_precision


def cuda_profile(options: PlanOptions, batch_size: int) -> Profile:
    """The profile of one micro-batch, probed on `options.device`; ConfigErrors name the fix."""
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {options.device}: no CUDA device here; use --device cpu for a "
                          f"meta estimate (it needs no GPU)")
    key = model_key(options.model, options.siglip, options.force_patch_dropout, weights_precision(options))
    try:
        return _probe(key, batch_size, autocast_dtype(options), options.grad_checkpointing,
                      torch.device(options.device))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise ConfigError(f"--batch-size {batch_size} ran out of GPU memory in the probe: lower "
                          f"--batch-size and raise --accum-freq (or --batch-size auto)") from None


def _probe(key: tuple, batch_size: int, dtype: torch.dtype | None, grad_checkpointing: bool,
           device: torch.device) -> Profile:
    """One real micro-batch forward + backward on the GPU.

    The weights are measured as the model is built. The model and its gradients (allocated
    up front, as after the first backward) are the baseline; the inputs are allocated
    before the peak counter is reset, so the activations are `max_memory_allocated` above
    all of them: the saved tensors and backward's transients.
    """
    torch.cuda.synchronize(device)
    empty = torch.cuda.memory_allocated(device)
    net = build(key, device)
    weights = torch.cuda.memory_allocated(device) - empty  # measured: the allocator's rounding too
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    (height, width), context = input_shapes(key)
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
            loss = sum(v.float().sum() for k, v in outputs.items() if k.endswith("_features"))
            if CaptionLoss.applies_to(outputs):  # CoCa: as the engine runs it
                caption = CaptionLoss()
                loss = loss + caption(outputs, caption.count(outputs))
        features = {k: outputs[k].detach() for k in ("image_features", "text_features") if k in outputs}
        del outputs  # as the engine: only the caption loss keeps the logits for backward
        loss.backward()
        del loss
        torch.cuda.synchronize(device)
        activations = torch.cuda.max_memory_allocated(device) - baseline
        measured = {"checkpointed" if grad_checkpointing else "activations": activations}
        measured.setdefault("activations", None)
        measured.setdefault("checkpointed", None)
        found = profile(net, batch_size, (images, texts), features, **measured)
        return dataclasses.replace(found, param_bytes=weights - found.buffer_bytes)
    finally:
        del net
        torch.cuda.empty_cache()
