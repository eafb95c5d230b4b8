"""The engine on a real GPU: exactness under CUDA's kernels, precisions and transfers.

Run with `python -m pytest -m cuda` on a machine with a CUDA GPU (scripts/gpu_check.sh
does); elsewhere every test here is skipped. The reference is the one of
test_accumulation: every micro-batch forward with grad under the same RNG seed,
features concatenated, the loss once, one backward.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import socket

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

from bigbatch.accumulation import cached_backward
from bigbatch.inputs import DeviceCopier, normalize_on_device
from bigbatch.losses import ClipLoss
from bigbatch.patch_embedding import PatchEmbedding
from test_accumulation import assert_grad_close, grads, reference_backward
from tiny_models import open_clip_vit, uint8_batches

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 would round differently between the reference's and the engine's kernels."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pair(make_model):
    """Two identical models on the GPU that take uint8 images, as training builds them."""
    torch.manual_seed(1234)
    ref = make_model()
    normalize_on_device(ref.visual, CLIP_MEAN, CLIP_STD)
    ref = ref.to(CUDA).train()
    return ref, copy.deepcopy(ref)


def on_gpu(micro_batches):
    return [tuple(t.to(CUDA) for t in mb) for mb in micro_batches]


def run_both(make_model, sizes, rtol, autocast=contextlib.nullcontext, **kwargs):
    """The reference and cached_backward on identical models and uint8 micro-batches;
    kwargs go to cached_backward (`inputs` replaces the micro-batches it gets)."""
    ref, ours = pair(make_model)
    mbs = on_gpu(uint8_batches(sizes))
    loss_fn = ClipLoss()
    with autocast():
        reference_backward(ref, mbs, loss_fn, seed=7)  # seeds CPU and CUDA generators
    torch.manual_seed(7)
    cached_backward(ours, kwargs.pop("inputs", mbs), loss_fn, autocast=autocast, **kwargs)
    expected, actual = grads(ref), grads(ours)
    assert expected.keys() == actual.keys() and "logit_scale" in actual
    for name in expected:
        assert_grad_close(actual[name], expected[name], name, rtol=rtol)
    return ours


def test_exact_on_cuda_with_dropout_fp32():
    run_both(lambda: open_clip_vit(patch_dropout=0.5, dropout=0.2), [8, 8, 5], rtol=1e-5)


def test_bf16_autocast_with_dropout():
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    run_both(lambda: open_clip_vit(dropout=0.2), [8, 8, 8], rtol=2e-2, autocast=autocast)


def test_fp16_scaling_gives_the_unscaled_gradient():
    ref, ours = pair(lambda: open_clip_vit(dropout=0.1))
    mbs = on_gpu(uint8_batches([6, 6, 6]))
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.float16)
    torch.manual_seed(3)
    cached_backward(ref, mbs, ClipLoss(), autocast=autocast)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    torch.manual_seed(3)
    cached_backward(ours, mbs, ClipLoss(), autocast=autocast, grad_scaler=scaler)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.0)
    scaler.unscale_(optimizer)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert_grad_close(q.grad, p.grad, name, rtol=1e-2)


class Patches(nn.Module):
    """(B, 3, 32, 32) images -> (B, 16, dim) tokens of 8 x 8 patches."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, dim)

    def forward(self, images):
        return self.proj(images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2))


class SdpaTower(nn.Module):
    """A tiny CLIP whose attention is F.scaled_dot_product_attention with dropout: the fused
    kernels draw their masks from the CUDA generator, which pass 2 must replay."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.visual = Patches(dim)
        self.token = nn.Embedding(1000, dim)
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)])
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def attend(self, x, i):
        q, k, v = self.qkv[i](x).unflatten(-1, (3, 4, -1)).permute(2, 0, 3, 1, 4)  # (B, heads, L, d)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3).mean(dim=(1, 2))

    def forward(self, images, texts):
        return {"image_features": F.normalize(self.attend(self.visual(images), 0), dim=-1),
                "text_features": F.normalize(self.attend(self.token(texts), 1), dim=-1),
                "logit_scale": self.logit_scale}


@pytest.mark.parametrize("backend, dtype, rtol", [
    ("EFFICIENT_ATTENTION", None, 1e-5),  # fp32: a mask not replayed would be far off
    ("FLASH_ATTENTION", torch.bfloat16, 2e-2),  # flash is bf16/fp16 only: bf16's tolerance
])
def test_fused_attention_dropout_is_replayed(backend, dtype, rtol):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    autocast = functools.partial(torch.autocast, "cuda", dtype=dtype) if dtype else contextlib.nullcontext
    with sdpa_kernel(getattr(SDPBackend, backend)):
        run_both(SdpaTower, [8, 8, 8], rtol=rtol, autocast=autocast)


def test_pinned_offload_with_prefetch_equals_inputs_on_the_device():
    host = [tuple(t.pin_memory() for t in mb) for mb in uint8_batches([8, 8, 8, 4])]
    on_device = run_both(lambda: open_clip_vit(dropout=0.1), [8, 8, 8, 4], rtol=1e-5)
    copier = DeviceCopier(CUDA, order=host + host[:-1])
    offloaded = run_both(lambda: open_clip_vit(dropout=0.1), [8, 8, 8, 4], rtol=1e-5,
                         inputs=host, to_device=copier)
    assert copier.cursor == len(host) * 2 - 1 and not copier.pending  # every copy used, in order
    for p, q in zip(on_device.parameters(), offloaded.parameters()):
        assert_close(q.grad, p.grad, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_gpu_ddp_step_equals_the_bare_model():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        ref, bare = pair(lambda: open_clip_vit(dropout=0.1))
        ddp = nn.parallel.DistributedDataParallel(bare, device_ids=[0])
        mbs = on_gpu(uint8_batches([8, 8, 8]))
        torch.manual_seed(5)
        cached_backward(ref, mbs, ClipLoss())
        torch.manual_seed(5)
        cached_backward(ddp, mbs, ClipLoss())
        for (name, p), q in zip(ref.named_parameters(), bare.parameters()):
            assert_grad_close(q.grad, p.grad, name, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_patch_embedding_is_the_convolution_on_cuda(dtype, tol):
    """bigbatch.patch_embedding's product against cuDNN's convolution, outputs and gradients,
    within `tol` of their norm (bf16 rounds the two kernels' sums differently)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 16, stride=16, bias=False).to(CUDA)
    matmul = copy.deepcopy(conv)
    matmul.__class__ = PatchEmbedding
    images = torch.randn(8, 3, 64, 64, device=CUDA)
    results = []
    for module in (conv, matmul):
        x = images.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = module(x)
        y.float().square().sum().backward()
        results.append((y.float(), x.grad, module.weight.grad))
    for expected, actual in zip(*results):
        assert actual.shape == expected.shape
        assert (actual - expected).norm() <= tol * expected.norm()
