"""The patch embedding as a matrix product: the convolution's outputs and gradients, the
same parameters, and every eligible convolution of a model switched (and back)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bigbatch.accumulation import cached_backward
from bigbatch.losses import ClipLoss
from bigbatch.patch_embedding import (PatchEmbedding, use_conv_patch_embedding,
                                      use_matmul_patch_embedding)
from tiny_models import batches, open_clip_vit, timm_tower


def as_product(conv: nn.Conv2d) -> PatchEmbedding:
    stem = copy.deepcopy(conv)
    stem.__class__ = PatchEmbedding
    return stem


class DtypesMade(TorchDispatchMode):
    """(dtype, elements) of every floating tensor the ops under it make, in order."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(t.dtype, t.numel()) for t in pytree.tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return out


@pytest.mark.parametrize("channels, out, patch, size, bias", [
    (3, 48, 8, (32, 32), False),   # open_clip's ViT: no bias
    (3, 40, 16, (40, 53), True),   # a remainder the convolution drops, and a bias
    (1, 24, (4, 2), (12, 10), True),  # a rectangular patch, grayscale
])
def test_outputs_and_gradients_are_the_convolutions(channels, out, patch, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, out, patch, stride=patch, bias=bias).double()
    matmul = as_product(conv)
    images = torch.randn(3, channels, *size, dtype=torch.float64)
    outputs = []
    for module in (conv, matmul):
        x = images.clone().requires_grad_()
        y = module(x)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y))
        outputs.append((y, x.grad, module.weight.grad, module.bias.grad if bias else None))
    for expected, actual in zip(*outputs):
        torch.testing.assert_close(actual, expected)


def test_inputs_the_product_does_not_cover_get_the_convolutions_answer():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    matmul = as_product(conv)
    unbatched, empty = torch.randn(3, 8, 8), torch.randn(0, 3, 8, 8)
    for images in (unbatched, empty):
        torch.testing.assert_close(matmul(images), conv(images))
    for images in (torch.randn(2, 1, 8, 8), torch.randn(2, 3, 2, 8)):  # wrong channels, under a patch
        with pytest.raises(RuntimeError) as theirs:
            conv(images)
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value)[:40])):
            matmul(images)


def test_under_autocast_the_product_runs_in_its_dtype():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 8, stride=8, bias=False)
    matmul = as_product(conv)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = conv(images)
        with DtypesMade() as made:
            actual = matmul(images)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
    # the image is cast first: its patches are rearranged at half the bytes
    image_sized = [dtype for dtype, numel in made.made if numel == images.numel()]
    assert len(image_sized) >= 2 and set(image_sized) == {torch.bfloat16}


def test_a_vit_switches_its_patchify_only_and_keeps_its_state_dict():
    torch.manual_seed(0)
    model = open_clip_vit()
    keys = list(model.state_dict())
    others = nn.ModuleList([nn.Conv2d(3, 8, 3, stride=1),   # overlapping windows
                            nn.Conv2d(3, 8, 1),             # pointwise
                            nn.Conv2d(64, 128, 2, stride=2),  # downsampling a feature map
                            nn.Conv2d(3, 8, 4, stride=4, padding=1),
                            nn.Conv2d(3, 8, 4, stride=4)])  # patchifying, but no ViT's stem
    model.extra = others
    assert use_matmul_patch_embedding(model) == 1
    assert type(model.visual.conv1) is PatchEmbedding
    assert all(type(conv) is nn.Conv2d for conv in others)
    del model.extra
    assert list(model.state_dict()) == keys
    use_conv_patch_embedding(model)
    assert type(model.visual.conv1) is nn.Conv2d


@pytest.mark.parametrize("trunk, stems, size", [("vit_tiny_patch16_224", 1, 224), ("convnext_atto", 0, 32)])
def test_timm_towers_switch_their_vit_stem_only(trunk, stems, size):
    """timm's ViTs flatten their PatchEmbed's output into tokens; ConvNeXt's patchifying
    stem feeds a convolutional trunk, which stays as cuDNN runs it."""
    torch.manual_seed(0)
    model = timm_tower(trunk).eval()
    images = torch.randn(2, 3, size, size)
    expected = model.encode_image(images)
    assert use_matmul_patch_embedding(model) == stems
    assert sum(type(m) is PatchEmbedding for m in model.modules()) == stems
    torch.testing.assert_close(model.encode_image(images), expected)


def test_the_accumulated_gradient_is_unchanged():
    torch.manual_seed(0)
    conv_model = open_clip_vit().double()
    matmul_model = copy.deepcopy(conv_model)
    use_matmul_patch_embedding(matmul_model)
    micro = [(images.double(), texts) for images, texts in batches([3, 3, 2])]
    for model in (conv_model, matmul_model):
        cached_backward(model, micro, ClipLoss())
    for (name, a), b in zip(conv_model.named_parameters(), matmul_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_models_loaded_for_cuda_run_the_matrix_product(monkeypatch):
    """Training, evaluation and the teacher load through load_model: built for a CUDA device,
    the stem is switched (open_clip builds on the CPU here, where no GPU is)."""
    import open_clip

    from bigbatch.model import register_model_config
    from bigbatch.weights import load_model, resolve_weights
    build = open_clip.create_model_and_transforms
    devices = []

    def on_cpu(*args, device, **kwargs):
        devices.append(torch.device(device).type)
        return build(*args, device="cpu", **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", on_cpu)
    config = str(Path(__file__).parent / "assets" / "test-clip.json")
    weights = resolve_weights(None, register_model_config(config))
    for device, stem in (("cuda", PatchEmbedding), ("cpu", nn.Conv2d)):
        model = load_model(config, weights, torch.device(device)).model
        assert type(model.visual.conv1) is stem
    assert devices == ["cuda", "cpu"]
