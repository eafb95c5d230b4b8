"""torchvision's RandomResizedCrop, with its random draws taken in one torch call.

torchvision draws each of up to 10 attempts with four one-element torch ops (uniform_,
log, exp, randint), about 10 µs each from Python: 110 µs a sample, a sixth of what the
loader spends on a small PNG (decode, crop, resize, tokenize). `FastRandomResizedCrop`
runs the same algorithm on 40 uniforms drawn at once from the same generator, so the
augmentation is still a function of the sample's seed (see bigbatch.data.seeding) and has
torchvision's distribution, but not its exact draws.
"""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

ATTEMPTS = 10  # torchvision's


class FastRandomResizedCrop(T.RandomResizedCrop):
    @staticmethod
    def get_params(img, scale, ratio) -> tuple[int, int, int, int]:
        _, height, width = F.get_dimensions(img)
        area = height * width
        low, high = math.log(ratio[0]), math.log(ratio[1])
        draws = torch.rand(4 * ATTEMPTS).tolist()
        for attempt in range(ATTEMPTS):
            u_area, u_ratio, u_top, u_left = draws[4 * attempt:4 * attempt + 4]
            target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
            aspect_ratio = math.exp(low + (high - low) * u_ratio)
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        return _central(height, width, ratio)


def _central(height: int, width: int, ratio) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest central crop within the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def fast_crops(steps: list) -> list:
    """`steps` with each torchvision RandomResizedCrop replaced by its fast twin."""
    return [_fast(step) if type(step) is T.RandomResizedCrop else step for step in steps]


def _fast(crop: T.RandomResizedCrop) -> FastRandomResizedCrop:
    return FastRandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio,
                                 interpolation=crop.interpolation, antialias=crop.antialias)
