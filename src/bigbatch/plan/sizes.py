"""Batch arithmetic and memory sizes: K from a global batch, '24GiB' in bytes.

Imports neither torch nor the rest of the planner: `bigbatch plan --help` and the
command's flag checks read it before torch is imported.
"""

from __future__ import annotations

import math
import re

from bigbatch.errors import ConfigError

GiB = 1024 ** 3
DEFAULT_RESERVE = 0.10  # of the GPU: CUDA context, allocator fragmentation, backward transients


def derive_accum_freq(global_batch_size: int, batch_size: int, world_size: int = 1) -> int:
    """K = G / (b x W); a ConfigError naming micro-batch sizes that divide if it does not."""
    for name, value in (("global-batch-size", global_batch_size), ("batch-size", batch_size),
                        ("world-size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if global_batch_size % world_size:
        raise ConfigError(f"--global-batch-size {global_batch_size} does not split over --world-size "
                          f"{world_size}: use a global batch that is a multiple of {world_size}")
    per_rank = global_batch_size // world_size
    if per_rank % batch_size:
        near = _nearest_divisors(per_rank, batch_size)
        options = " or ".join(f"{d} (accum-freq {per_rank // d})" for d in near)
        raise ConfigError(f"--global-batch-size {global_batch_size} is not a whole number of "
                          f"--batch-size {batch_size} x --world-size {world_size} micro-batches: "
                          f"use a --batch-size that divides {per_rank}, e.g. {options}")
    return per_rank // batch_size


def _nearest_divisors(n: int, b: int) -> list[int]:
    """The divisors of n just below and just above b."""
    found = divisors(n)
    below = [d for d in found if d < b]
    above = [d for d in found if d > b]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_memory(text: str | int) -> int:
    """'24GiB', '80GB', '512MiB', '24G' (binary, like nvidia-smi and SLURM) -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        hint = " (add a unit)" if match and not unit else ""
        raise ConfigError(f"--gpu-memory {text!r}: write a size with a unit{hint}, "
                          f"e.g. 24GiB, 80GB or 512MiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ConfigError(f"--gpu-memory {text!r} must be more than zero")
    return value


def gib(n: int | float | None) -> str:
    """Bytes as GiB with two decimals ('?' when unknown), as the plan's table prints them."""
    return "?" if n is None else f"{n / GiB:.2f}"
