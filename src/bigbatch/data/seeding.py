"""Deterministic random streams keyed by (seed, epoch, rank, ...).

A DataLoader's workers seed their augmentation from a base seed it draws when an epoch's
iteration starts; drawn from a generator reseeded per (seed, rank, epoch), rather than
from torch's global one, it is the same in a resumed run as in an uninterrupted one, and
loading never shifts the training process's own random stream (dropout masks).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def make_rng(*keys: object) -> random.Random:
    """A generator determined by ``keys`` alone: string seeds are hashed with SHA-512, so the
    stream is the same in every process and run (unlike ``hash``) and (1, 0) != (0, 1)."""
    return random.Random(":".join(map(str, keys)))


def reseed(generator: torch.Generator, *keys: object) -> torch.Generator:
    """Set a torch generator from ``keys`` alone (63 bits: manual_seed takes a signed int64)."""
    return generator.manual_seed(make_rng(*keys).getrandbits(63))


def make_np_rng(*keys: object) -> np.random.Generator:
    """``make_rng`` for numpy, for permutations of millions of indices."""
    return np.random.default_rng(make_rng(*keys).getrandbits(64))
