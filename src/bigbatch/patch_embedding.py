"""ViT's patch embedding as one matrix product, on CUDA.

A convolution whose kernel equals its stride (no padding, dilation or groups) cuts the
image into non-overlapping patches and projects each: it is a matrix product of the
flattened patches (B*h*w, C*p*q) with the flattened kernel (C*p*q, O). cuDNN runs it as
a generic convolution instead: on an H200, ViT-B-32's patch embedding took 8.4 ms forward
and 9.3 ms backward at batch 1024 in bf16 (bench/gpu), 8% of the whole training step;
the product is well under a millisecond each way.

`PatchEmbedding` is an `nn.Conv2d` (same parameters, same state_dict keys, so checkpoints
and open_clip export are unchanged) with that forward; `use_matmul_patch_embedding`
switches a model's patchifying stems to it, `use_conv_patch_embedding` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        device_type = images.device.type
        if torch.is_autocast_enabled(device_type):  # rearrange the patches in the product's dtype
            images = images.to(torch.get_autocast_dtype(device_type))
        patches = (images[:, :, :h * p, :w * q].reshape(batch, c, h, p, w, q)
                   .permute(0, 2, 4, 1, 3, 5).reshape(batch * h * w, c * p * q))
        out = F.linear(patches, self.weight.reshape(channels, c * p * q), self.bias)
        return out.reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def is_patchifying(module: nn.Module) -> bool:
    """A stem that cuts the image itself (at most 4 channels) into patches of 2 pixels or
    more; not the 1x1 or downsampling convolutions inside ResNets and ConvNeXts, whose
    speed as a matrix product on feature maps was never measured."""
    return (type(module) is nn.Conv2d and module.kernel_size == module.stride
            and module.kernel_size[0] * module.kernel_size[1] > 1 and module.in_channels <= 4
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros")


def use_matmul_patch_embedding(model: nn.Module) -> int:
    """Switch every patchifying Conv2d of `model` to PatchEmbedding, in place; the count."""
    convs = [m for m in model.modules() if is_patchifying(m)]
    for conv in convs:
        conv.__class__ = PatchEmbedding  # a subclass adding no state: parameters stay as they are
    return len(convs)


def use_conv_patch_embedding(model: nn.Module) -> None:
    """Back to plain convolutions (what open_clip itself runs)."""
    for module in model.modules():
        if type(module) is PatchEmbedding:
            module.__class__ = nn.Conv2d
