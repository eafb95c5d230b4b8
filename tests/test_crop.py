"""bigbatch.crop: torchvision's RandomResizedCrop, drawn in one torch call, same distribution."""

from __future__ import annotations

import statistics

import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from bigbatch.crop import FastRandomResizedCrop
from bigbatch.inputs import uint8_transform


def draws(crop_class, image, scale, ratio, n=4000, seed=0):
    torch.manual_seed(seed)
    return [crop_class.get_params(image, scale, ratio) for _ in range(n)]


def summary(params, height, width):
    """Mean area share, log aspect ratio and relative position of the crops."""
    return (statistics.fmean(h * w / (height * width) for i, j, h, w in params),
            statistics.fmean(torch.tensor(w / h).log().item() for i, j, h, w in params),
            statistics.fmean((i + h / 2) / height for i, j, h, w in params),
            statistics.fmean((j + w / 2) / width for i, j, h, w in params))


@pytest.mark.parametrize("size, scale, ratio", [((64, 48), (0.08, 1.0), (3 / 4, 4 / 3)),
                                                 ((40, 90), (0.9, 1.0), (3 / 4, 4 / 3)),
                                                 ((32, 32), (0.5, 0.5), (1.0, 2.0))])
def test_crops_follow_torchvisions_distribution(size, scale, ratio):
    width, height = size
    image = Image.new("RGB", size)
    fast = draws(FastRandomResizedCrop, image, scale, ratio)
    reference = draws(T.RandomResizedCrop, image, scale, ratio, seed=1)
    assert all(0 <= i and 0 <= j and i + h <= height and j + w <= width and h > 0 and w > 0
               for i, j, h, w in fast)
    for mine, theirs in zip(summary(fast, height, width), summary(reference, height, width)):
        assert mine == pytest.approx(theirs, abs=0.02)


def test_an_image_no_attempt_fits_gets_torchvisions_central_crop():
    image = Image.new("RGB", (200, 10))  # aspect 20: no crop of ratio <= 4/3 covers 90% of it
    fast = draws(FastRandomResizedCrop, image, (0.9, 1.0), (3 / 4, 4 / 3), n=5)
    reference = draws(T.RandomResizedCrop, image, (0.9, 1.0), (3 / 4, 4 / 3), n=5)
    assert fast == reference == [(0, 93, 10, 13)] * 5


def test_the_same_seed_draws_the_same_crops():
    image = Image.new("RGB", (64, 48))
    assert draws(FastRandomResizedCrop, image, (0.08, 1.0), (0.75, 4 / 3), n=50, seed=3) == \
        draws(FastRandomResizedCrop, image, (0.08, 1.0), (0.75, 4 / 3), n=50, seed=3)


def test_open_clips_train_transform_gets_the_fast_crop_with_its_settings():
    _, train, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    original = next(s for s in train.transforms if isinstance(s, T.RandomResizedCrop))
    rewritten, mean, std = uint8_transform(train)
    crop = next(s for s in rewritten.transforms if isinstance(s, T.RandomResizedCrop))
    assert type(crop) is FastRandomResizedCrop and mean is not None
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation, crop.antialias) == \
        (original.size, original.scale, original.ratio, original.interpolation, original.antialias)
    image = Image.new("RGB", (300, 200), (10, 200, 30))
    out = rewritten(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
