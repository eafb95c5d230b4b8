"""Deterministic random streams keyed by (seed, epoch, rank, ...)."""

from __future__ import annotations

import random

import numpy as np


def make_rng(*keys: object) -> random.Random:
    """A generator determined by ``keys`` alone: string seeds are hashed with SHA-512, so the
    stream is the same in every process and run (unlike ``hash``) and (1, 0) != (0, 1)."""
    return random.Random(":".join(map(str, keys)))


def make_np_rng(*keys: object) -> np.random.Generator:
    """``make_rng`` for numpy, for permutations of millions of indices."""
    return np.random.default_rng(make_rng(*keys).getrandbits(64))
