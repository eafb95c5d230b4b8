"""--device and --precision resolved, and open_clip_train's CUDA settings."""

from __future__ import annotations

import pytest
import torch

from bigbatch.device import pick_device, resolve_precision, use_fast_cuda_math
from bigbatch.errors import ConfigError


@pytest.fixture
def cuda_math_flags():
    """pick_device and use_fast_cuda_math set process-wide flags: restored after the test."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


def test_auto_and_explicit_devices(cuda_math_flags):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        pick_device("gpu0")


def test_precision_spellings():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("amp_bfloat16", cpu) == "amp_bf16"
    with pytest.raises(ConfigError, match="on CPU use --precision fp32 or amp_bf16"):
        resolve_precision("amp", cpu)


def test_fast_cuda_math_is_open_clip_trains_and_stays_readable(cuda_math_flags):
    """cuDNN benchmark and TF32 through the switch open_clip_train (and our CUDA tests, which
    turn TF32 off) use: torch raises on reading a precision set through two APIs, and
    inductor reads it."""
    use_fast_cuda_math()
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    torch.backends.cuda.matmul.allow_tf32 = False  # as tests/test_cuda.py's fixture does
    assert torch.get_float32_matmul_precision() == "highest"
