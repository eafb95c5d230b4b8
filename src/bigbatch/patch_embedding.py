"""ViT's patch embedding as one matrix product, on CUDA.

A convolution whose kernel equals its stride (no padding, dilation or groups) cuts the
image into non-overlapping patches and projects each: it is a matrix product of the
flattened patches (B*h*w, C*p*q) with the flattened kernel (C*p*q, O). cuDNN runs it as
a generic convolution instead: on an H200, ViT-B-32's patch embedding took 8.4 ms forward
and 9.3 ms backward at batch 1024 in bf16 (bench/gpu), 8% of the whole training step;
the product is well under a millisecond each way.

`PatchEmbedding` is an `nn.Conv2d` (same parameters, same state_dict keys, so checkpoints
and open_clip export are unchanged) with that forward; `use_matmul_patch_embedding`
switches the stems of a model's ViTs to it, `use_conv_patch_embedding` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts


class PatchEmbedding(nn.Conv2d):
    """A patchifying Conv2d computed as a matrix product; the output is the convolution's
    (B, O, h, w) in channels-last memory, which ViTs flatten to (B, h*w, O) without a copy.
    Inputs the product does not cover (not a batch of 4-D images with this stem's channels,
    or smaller than one patch) go to the convolution, which also says what is wrong."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (p, q), channels = self.kernel_size, self.out_channels
        if images.dim() != 4 or images.shape[1] != self.in_channels or min(images.shape) == 0:
            return super().forward(images)
        batch, c, height, width = images.shape
        h, w = height // p, width // q  # as the convolution, drop a remainder
        if h * w == 0:
            return super().forward(images)
        if images.dtype in AUTOCAST_CASTS and _autocast_on(images.device.type):
            images = images.to(torch.get_autocast_dtype(images.device.type))  # rearranged at its size
        patches = (images[:, :, :h * p, :w * q].reshape(batch, c, h, p, w, q)
                   .permute(0, 2, 4, 1, 3, 5).reshape(batch * h * w, c * p * q))
        out = F.linear(patches, self.weight.reshape(channels, c * p * q), self.bias)
        return out.reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)


# A ViT's patch embedding: the parent's class name and the attribute holding its stem, whose
# output the parent flattens into tokens (so the product's channels-last output costs nothing)
TOKEN_STEMS = {"VisionTransformer": "conv1",  # open_clip's own ViT
               "PatchEmbed": "proj"}          # timm's ViTs, EVA02, SigLIP towers


def is_patchifying(module: nn.Module) -> bool:
    """A convolution that cuts the image itself (at most 4 channels) into non-overlapping
    patches of 2 pixels or more."""
    return (type(module) is nn.Conv2d and module.kernel_size == module.stride
            and module.kernel_size[0] * module.kernel_size[1] > 1 and module.in_channels <= 4
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros")


def token_stems(model: nn.Module) -> list[nn.Conv2d]:
    """The patchifying stems of `model`'s ViTs. Not ConvNeXt's patchifying stem: its
    channels-last output would carry through the whole trunk, whose convolutions were never
    timed that way; nor the convolutions inside ResNets and ConvNeXts."""
    stems = (getattr(parent, TOKEN_STEMS.get(type(parent).__name__, ""), None) for parent in model.modules())
    return [stem for stem in stems if stem is not None and is_patchifying(stem)]


def use_matmul_patch_embedding(model: nn.Module) -> int:
    """Switch the patchifying stems of `model`'s ViTs to PatchEmbedding, in place; the count."""
    stems = token_stems(model)
    for stem in stems:
        stem.__class__ = PatchEmbedding  # a subclass adding no state: parameters stay as they are
    return len(stems)


def use_matmul_patch_embedding_on(model: nn.Module, device: torch.device | str) -> None:
    """The product on CUDA, where cuDNN's patchify is slow; elsewhere the convolution stays."""
    if torch.device(device).type == "cuda":
        use_matmul_patch_embedding(model)


def use_conv_patch_embedding(model: nn.Module) -> None:
    """Back to plain convolutions (what open_clip itself runs)."""
    for module in model.modules():
        if type(module) is PatchEmbedding:
            module.__class__ = nn.Conv2d
