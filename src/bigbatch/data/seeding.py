"""Deterministic random streams keyed by (seed, epoch, rank, ...).

Random augmentations run on torch's global generator. Reseeded from (seed, epoch, sample)
for each sample (``augment_stream``), they depend neither on what a persistent worker did
before nor on --workers: a resumed run augments as an uninterrupted one did. The
DataLoader's own base seed comes from a private generator, so loading never draws on the
training process's random stream (its dropout masks).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import get_worker_info


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


@contextlib.contextmanager
def augment_stream(*keys: object):
    """Augment one sample from ``keys`` alone: in a worker, on its global generator; in the
    main process (--workers 0), on a fork of it, so the trainer's stream stays untouched.

    Only the CPU generator is seeded (augmentations run on the CPU): torch.manual_seed
    would also queue a lazy seed for every accelerator type, recording a stack trace each
    time, which made it cost as much as decoding the image."""
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(make_rng(*keys).getrandbits(63))
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(make_rng(*keys).getrandbits(63))
        yield
