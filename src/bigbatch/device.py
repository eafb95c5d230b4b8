"""Where a run computes and in what precision: `--device` and `--precision`, for train and eval."""

from __future__ import annotations

import contextlib
import functools

import torch

from bigbatch.errors import ConfigError

AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' (CUDA if visible, else CPU), 'cpu', 'cuda' (this rank's GPU) or 'cuda:N'.
    A CUDA device also switches on use_fast_cuda_math, for the whole process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        use_fast_cuda_math()
    return device


def use_fast_cuda_math() -> None:
    """open_clip_train's CUDA settings: cuDNN times its kernels for each new shape and keeps
    the fastest (benchmark), and float32 matrix products run in TF32 (the autocast
    precisions compute in bf16/fp16 anyway; --precision fp32 gets TF32's 10-bit mantissa)."""
    torch.backends.cudnn.benchmark = True
    # open_clip_train's own switch: torch refuses to read a precision set through both
    # this and torch.set_float32_matmul_precision / fp32_precision
    torch.backends.cuda.matmul.allow_tf32 = True


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' is amp (float16) on CUDA and fp32 on CPU. Only amp and amp_bf16 autocast;
    pure_bf16 / pure_fp16 (and open_clip's bf16 / fp16) cast the weights themselves."""
    if name == "auto":
        return "amp" if device.type == "cuda" else "fp32"
    if name == "amp_bfloat16":  # open_clip_train's other spelling
        return "amp_bf16"
    if name == "amp" and device.type != "cuda":
        raise ConfigError("--precision amp (float16) is for CUDA: on CPU use --precision fp32 or amp_bf16")
    return name


def autocast_factory(precision: str, device: torch.device):
    """A no-argument factory of the mixed-precision context (a null one for fp32)."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=AUTOCAST_DTYPES[precision])


def set_threads(threads: int | None) -> None:
    """--threads: torch's intra-op threads (None: torch's choice, one per core). On a
    machine shared with other CPU-bound work, one thread per core oversubscribes the
    cores and every thread waits for the slowest: fewer threads run faster."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
