"""Indexable sources (CSV, synthetic) -> ``Batch``es: an epoch is every row once.

One permutation of the rows per (seed, epoch) is dealt out to the ranks in turn, so every
row is trained exactly once per epoch and the ranks' shares differ by one row at most;
nothing is repeated or padded. A bad row is skipped and counted (its batch is one smaller:
uneven micro-batches are exact), once per epoch, when its turn comes; a batch of bad rows
only leaves its rank a step short, and the loader stops every rank together then, counting
what the others had left (bigbatch.data.loader).
"""

from __future__ import annotations

import logging
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
from .samples import BadSample, Sample
from .seeding import augment_stream, make_np_rng, reseed
from .spec import DataInfo, DataSpec

log = logging.getLogger("bigbatch")


class Source(Protocol):
    """Rows that can be loaded one by one; ``load`` raises ``BadSample`` for a bad row."""

    name: str  # how the user named the data, for messages

    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...


class EpochBatches(Sampler[list[int]]):
    """This rank's batches of row indices for one epoch of the first ``length`` rows.

    Training: a fresh permutation per (seed, epoch); rank r takes its rows r, r + W, ... and
    cuts them into batches of ``batch_size``. Ranks must take the same number of steps: a
    rank one batch short (its share a multiple of the batch size, another's one row more)
    splits its last batch in two. Validation: rows in order, dealt out likewise, no split.
    A prefix of the permutation is trained after any number of full batches, so a resumed
    epoch stays exact when the batch size or world size changed.
    ``start``: batches of the epoch already trained (a resumed epoch) are left out.
    """

    def __init__(self, length: int, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int):
        self.length, self.batch_size, self.shuffle = length, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self._batch_count() - self.start)

    def _batch_count(self) -> int:
        most = math.ceil(self.length / self.world_size)  # the largest rank's share
        mine = len(range(self.rank, self.length, self.world_size))
        return math.ceil((most if self.shuffle else mine) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rows = (make_np_rng(self.seed, self.epoch).permutation(self.length) if self.shuffle
                else np.arange(self.length))[self.rank::self.world_size].tolist()
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if batches and len(batches) < self._batch_count():
            last = batches.pop()
            batches += [last[:len(last) // 2], last[len(last) // 2:]]
        return iter(batches[self.start:])


class RowDataset(Dataset):
    """Items ``(sample, None)`` or, for a bad row, ``(None, why it was skipped)``."""

    def __init__(self, source: Source, seed: int):
        self.source, self.seed = source, seed
        self.epoch = multiprocessing.Value("q", 0)  # shared: set_epoch reaches persistent workers

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Sample | None, BadSample | None]:
        with augment_stream(self.seed, "augment", self.epoch.value, index):  # the sample's alone
            try:
                return self.source.load(index), None
            except BadSample as bad:
                return None, bad


class MapCollate:
    """Collate ``RowDataset`` items; count the skipped rows of this batch."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[Sample | None, BadSample | None]]) -> Batch:
        bad = [b for _, b in items if b is not None]
        skipped, named = Counter(b.reason for b in bad), tuple(str(b) for b in bad)
        samples = [sample for sample, _ in items if sample is not None]
        if not samples:  # a batch of bad rows only: the loader passes its count on
            return Batch(None, None, None, dict(skipped), named)
        return collate(samples, self.tokenizer, skipped)._replace(bad=named)


def make_map_data(source: Source, spec: DataSpec, tokenizer: Tokenizer) -> DataInfo:
    """Batches from an indexable source; an epoch is ``num_samples`` rows (default: all)."""
    length = min(spec.num_samples or len(source), len(source))
    if spec.num_samples and spec.num_samples > len(source):
        log.warning(f"{source.name} holds {len(source)} rows, fewer than the {spec.num_samples} "
                    f"samples asked for: an epoch trains each of them once")
    batches = EpochBatches(length, spec.batch_size, spec.is_train, spec.seed, spec.rank, spec.world_size)
    dataset = RowDataset(source, spec.seed)

    def set_epoch(epoch: int, skip_batches: int) -> None:
        # augmentations are a function of (seed, epoch, row): leaving rows out changes no other
        batches.set_epoch(epoch, start=skip_batches)
        dataset.epoch.value = epoch

    generator = reseed(torch.Generator(), spec.seed, "loader", spec.rank)  # see seeding.py
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=spec.workers,
                        collate_fn=MapCollate(tokenizer), generator=generator,
                        persistent_workers=spec.workers > 0, prefetch_factor=spec.prefetch_factor(spec.workers),
                        pin_memory=torch.cuda.is_available(),
                        worker_init_fn=shield_loader_worker)  # SLURM's SIGTERM is the trainer's
    synced = spec.is_train and spec.world_size > 1
    return DataInfo(Loader(loader, len(batches), source.name, synced=synced), length, len(batches), set_epoch)
