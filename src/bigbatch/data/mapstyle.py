"""Indexable sources (CSV, synthetic) -> ``Batch``es, with a per-epoch permutation split across ranks.

In training a bad row is replaced by a readable one picked at random (and counted), rather
than dropped: every rank must yield batches of the same size, or the feature all-gather of
the loss would fail. Each bad row is counted once per epoch, when its own turn comes. In
validation a bad row is dropped (and counted): a stand-in would count a sample twice.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import Counter
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bigbatch.preemption import shield_loader_worker

from .batch import Batch, Tokenizer, collate
from .loader import Loader
from .samples import BadSample, DataError, Sample
from .seeding import augment_stream, make_np_rng, make_rng, reseed
from .spec import DataInfo, DataSpec

MAX_REPLACEMENT_TRIES = 1000  # rows tried in place of a bad one before giving up on the data


class Source(Protocol):
    """Rows that can be loaded one by one; ``load`` raises ``BadSample`` for a bad row."""

    name: str  # how the user named the data, for messages

    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...


class EpochSampler(Sampler[int]):
    """This rank's row indices for one epoch of ``length`` samples over ``size`` rows.

    Training: a fresh permutation per (seed, epoch), repeated if ``length > size``, padded by
    wrapping around so every rank gets the same count (as DistributedSampler), then strided
    by rank. Validation: rows in order, strided by rank, no padding (no sample counted twice).
    ``start``: this rank's first indices of the epoch to leave out (a resumed epoch).
    """

    def __init__(self, size: int, length: int, shuffle: bool, seed: int, rank: int, world_size: int):
        self.size, self.length, self.shuffle = size, length, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self._epoch_length() - self.start)

    def _epoch_length(self) -> int:
        if self.shuffle:
            return math.ceil(self.length / self.world_size)
        return len(range(self.rank, self.length, self.world_size))

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(i % self.size for i in range(self.rank, self.length, self.world_size)[self.start:])
        rng = make_np_rng(self.seed, self.epoch)
        passes = math.ceil(self.length / self.size)
        order = np.concatenate([rng.permutation(self.size) for _ in range(passes)])[:self.length]
        order = np.resize(order, self._epoch_length() * self.world_size)  # pads by wrapping around
        return iter(order[self.rank::self.world_size][self.start:].tolist())


class ReplacingDataset(Dataset):
    """Items ``(sample, why the scheduled row was skipped or None)``; bad rows are replaced
    (``replace``) or come back as ``(None, why)``."""

    def __init__(self, source: Source, seed: int, replace: bool = True):
        self.source, self.seed, self.replace = source, seed, replace
        self.epoch = multiprocessing.Value("q", 0)  # shared: set_epoch reaches persistent workers

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Sample, BadSample | None]:
        with augment_stream(self.seed, "augment", self.epoch.value, index):  # the sample's alone
            try:
                return self.source.load(index), None
            except BadSample as bad:
                return (self._replacement(index) if self.replace else None), bad

    def _replacement(self, index: int) -> Sample:
        n = len(self.source)
        # random rows, not the next ones: a run of bad rows (a missing folder) stays cheap
        tries = make_rng(self.seed, "replace", index).sample(range(n), min(n, MAX_REPLACEMENT_TRIES))
        last = None
        for other in tries:
            try:
                return self.source.load(other)
            except BadSample as bad:
                last = bad
        raise DataError(f"no usable row in {self.source.name}: {len(tries)} rows tried, all bad "
                        f"(last: {last}): fix the data or the image paths")


class MapCollate:
    """Collate ``ReplacingDataset`` items; count the skipped rows of this batch."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[Sample | None, BadSample | None]]) -> Batch:
        bad = [b for _, b in items if b is not None]
        skipped, named = Counter(b.reason for b in bad), tuple(str(b) for b in bad)
        samples = [sample for sample, _ in items if sample is not None]
        if not samples:  # a validation batch of bad rows only: the loader passes its count on
            return Batch(None, None, None, dict(skipped), named)
        return collate(samples, self.tokenizer, skipped)._replace(bad=named)


def make_map_data(source: Source, spec: DataSpec, tokenizer: Tokenizer) -> DataInfo:
    """Batches from an indexable source; an epoch is ``num_samples`` rows (default: all)."""
    length = spec.num_samples or len(source)
    sampler = EpochSampler(len(source), length, spec.is_train, spec.seed, spec.rank, spec.world_size)
    dataset = ReplacingDataset(source, spec.seed, replace=spec.is_train)

    def set_epoch(epoch: int, skip_batches: int) -> None:
        # augmentations are a function of (seed, epoch, row): leaving rows out changes no other
        sampler.set_epoch(epoch, start=skip_batches * spec.batch_size)
        dataset.epoch.value = epoch

    generator = reseed(torch.Generator(), spec.seed, "loader", spec.rank)  # see seeding.py
    loader = DataLoader(dataset, batch_size=spec.batch_size, sampler=sampler,
                        num_workers=spec.workers, collate_fn=MapCollate(tokenizer),
                        generator=generator, persistent_workers=spec.workers > 0,
                        pin_memory=torch.cuda.is_available(),
                        worker_init_fn=shield_loader_worker)  # SLURM's SIGTERM is the trainer's
    num_batches = math.ceil(len(sampler) / spec.batch_size)
    num_samples = len(sampler) * spec.world_size if spec.is_train else length
    return DataInfo(Loader(loader, num_batches, source.name), num_samples, num_batches, set_epoch)
