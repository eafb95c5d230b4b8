"""Webdataset shards -> ``Batch``es, split across ranks and workers, shuffled from (seed, epoch).

Training, per DataLoader worker:

1. Each pass shuffles the shard list with (seed, epoch, pass), identically on every rank,
   and takes the slice ``[rank::world_size][worker::workers]``: ranks and workers never
   overlap. With ``resampled`` a worker instead draws shards with replacement.
2. Each pass streams through a shuffle buffer of raw bytes (seeded per rank, worker and
   pass), then samples are decoded and preprocessed; bad ones are skipped and counted.
3. The worker stops at its quota: the rank's ``ceil(num_samples / world_size)`` samples,
   dealt out in whole batches to the workers in the DataLoader's round-robin order, so
   every rank yields the same number of batches and only the epoch's last batch is partial.
   Passes repeat (reshuffled) until the quota is filled.
4. A resumed epoch (``skip_batches``) leaves out the rank's first batches: each worker
   builds and drops its round-robin share of them, so that the shuffle and augmentation
   streams continue exactly as in an uninterrupted run (it costs their loading time),
   and the workers' roles rotate so that batches still arrive in the same order.

A shard that gives no usable sample is not read again by that worker; a worker whose
shards are all unusable reads the others', and only when no shard is usable does the
loader fail, with a ``DataError``. Validation reads this rank's shards once, in order.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections import Counter
from itertools import count, islice
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import Batch, Tokenizer, collate
from .loader import Loader
from .samples import CORRUPT_SHARD, BadSample, DataError, Preprocess, Sample, load_image
from .seeding import make_rng, reseed, seed_worker
from .shards import CorruptShard, check_shards, parse_sample, read_shard, shard_sizes
from .spec import DataInfo, DataSpec, expand_paths

SHUFFLE_BUFFER = 2000  # raw samples held per worker for shuffling
SHUFFLE_INITIAL = 500  # samples buffered before the first one leaves

Parsed = tuple[bytes, str, int | None]  # (encoded image, caption, label)


def _decodes(image: bytes) -> bool:
    try:
        load_image(image, lambda rgb: rgb)
        return True
    except BadSample:
        return False


class ShardStream(IterableDataset):
    """Yields the ``Batch``es of one rank's worker (see the module docstring)."""

    def __init__(self, shards: list[str], spec: DataSpec, preprocess: Preprocess,
                 tokenizer: Tokenizer, samples_per_rank: int | None):
        super().__init__()
        self.shards, self.spec = shards, spec
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.samples_per_rank = samples_per_rank  # None: read once (validation)
        # shared memory, so that set_epoch in the main process reaches persistent workers
        self.epoch = multiprocessing.Value("q", 0)
        self.skip_batches = multiprocessing.Value("q", 0)
        # per process from here on: each worker has its own copy
        self.pending: Counter = Counter()  # skips not yet reported in a batch
        self.total: Counter = Counter()
        self.last_problem = ""
        self.dead: set[str] = set()  # shards that gave no usable sample
        self.warned: set[str] = set()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch.value, self.skip_batches.value = epoch, skip_batches

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        process, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, skip = self.epoch.value, self.skip_batches.value
        # The DataLoader asks its workers in turn from the first: after `skip` batches, the
        # first must play the stream of the worker that owns batch `skip`, and so on.
        worker = (process + skip) % workers
        seed_worker(self.spec.seed, "augment", epoch, self.spec.rank, worker)
        if self.samples_per_rank is None:
            mine = self.shards[self.spec.rank::self.spec.world_size][worker::workers]
            samples = self._decode(self._read(mine))
        else:
            raw = self._shuffled(epoch, worker, workers)
            samples = islice(self._decode(raw), self._quota(worker, workers))
        yield from islice(self._batches(samples), len(range(worker, skip, workers)), None)
        if self.pending:  # met after the last batch, with no batch left to carry them
            logging.warning("rank %d worker %d skipped after its last batch: %s",
                            self.spec.rank, worker, dict(self.pending))
            self.pending.clear()

    def _batches(self, samples: Iterator[Sample]) -> Iterator[Batch]:
        """Batches that carry the skips met while they were built. A full batch leaves only
        once the next sample exists, so the last one also carries skips met at the very end."""
        batch: list[Sample] = []
        for sample in samples:
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch)
                batch = []
            batch.append(sample)
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: list[Sample]) -> Batch:
        skipped, self.pending = self.pending, Counter()
        return collate(batch, self.tokenizer, skipped)

    def _quota(self, worker: int, workers: int) -> int:
        """This worker's samples per epoch: whole batches, dealt round-robin; the worker that
        yields the rank's last batch gives it short, so only that batch is partial."""
        size, per_rank = self.spec.batch_size, self.samples_per_rank
        batches = math.ceil(per_rank / size)
        mine = batches // workers + (worker < batches % workers)
        short = batches * size - per_rank if worker == (batches - 1) % workers else 0
        return mine * size - short

    def _shuffled(self, epoch: int, worker: int, workers: int) -> Iterator[Parsed]:
        """Endless passes over this worker's shards, each shuffled through its own buffer:
        the buffer drains at the end of a pass, so an epoch of one pass sees every sample once."""
        for n, shards in enumerate(self._passes(epoch, worker, workers)):
            rng = make_rng(self.spec.seed, epoch, self.spec.rank, worker, n)
            yield from wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, rng=rng)(self._read(shards))

    def _passes(self, epoch: int, worker: int, workers: int) -> Iterator[list[str]]:
        """The shards this worker reads, one list per pass over its share of the data."""
        spec = self.spec
        rng = make_rng(spec.seed, epoch, spec.rank, worker, "shards")
        for n in count():
            live = [s for s in self.shards if s not in self.dead]
            if not live:
                raise DataError(
                    f"no usable sample in any of the {len(self.shards)} shards of {spec.flag} {spec.paths!r} "
                    f"(skipped: {dict(self.total)}; last: {self.last_problem}): fix the data or the path")
            if spec.resampled:
                yield [rng.choice(live) for _ in self.shards]
                continue
            order = list(self.shards)
            make_rng(spec.seed, epoch, n).shuffle(order)  # the same on all ranks: a partition
            mine = [s for s in order[spec.rank::spec.world_size][worker::workers] if s not in self.dead]
            if not mine:  # better a few repeated samples than a worker that cannot fill its quota
                if "others" not in self.warned:
                    self.warned.add("others")
                    logging.warning("rank %d worker %d: none of its shards is usable; reading the others'",
                                    spec.rank, worker)
                mine = live
                rng.shuffle(mine)
            yield mine

    def _read(self, shards: Iterable[str]) -> Iterator[Parsed]:
        for url in shards:
            yield from self._read_shard(url)

    def _read_shard(self, url: str) -> Iterator[Parsed]:
        """The well-formed samples of one shard; counts the rest, marks the shard if none decodes."""
        usable = False
        try:
            for raw in read_shard(url):
                try:
                    image, caption, label = parse_sample(raw)
                except BadSample as bad:
                    self._skip(bad)
                    continue
                usable = usable or _decodes(image)  # one decode per shard, for the check above
                yield image, caption, label
        except CorruptShard as error:
            self._skip(BadSample(CORRUPT_SHARD, f"{url}: {error}"))
            if url not in self.warned:
                self.warned.add(url)
                logging.warning("skipping the rest of corrupt shard %s (%s)", url, error)
        if not usable:
            self.dead.add(url)

    def _decode(self, parsed: Iterator[Parsed]) -> Iterator[Sample]:
        for image, caption, label in parsed:
            try:
                yield Sample(load_image(image, self.preprocess), caption, label)
            except BadSample as bad:
                self._skip(bad)

    def _skip(self, bad: BadSample) -> None:
        self.pending[bad.reason] += 1
        self.total[bad.reason] += 1
        self.last_problem = str(bad)


def make_webdataset_data(spec: DataSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> DataInfo:
    """Batches from webdataset shards (see the module docstring)."""
    shards = expand_paths(spec.paths)
    check_shards(shards, spec)
    sizes = shard_sizes(shards) if spec.num_samples is None or not spec.is_train else {}
    known = sum(sizes.values()) if len(sizes) == len(shards) else None
    num_samples = spec.num_samples or known
    name = f"{spec.flag} {spec.paths!r}"

    if spec.is_train:
        workers = spec.workers
        if num_samples is None:
            raise ValueError(f"cannot tell how many samples {name} holds (no sizes.json or _info.json "
                             f"next to the shards lists them all): pass {spec.num_samples_flag}")
        if not spec.resampled and len(shards) < spec.world_size * max(1, workers):
            raise ValueError(f"{name} has {len(shards)} shards, fewer than the {spec.world_size} ranks x "
                             f"{max(1, workers)} workers that each need one: add shards, lower --workers, "
                             "or use --dataset-resampled")
        per_rank = math.ceil(num_samples / spec.world_size)
        num_batches = math.ceil(per_rank / spec.batch_size)
        num_samples = per_rank * spec.world_size
        stream = ShardStream(shards, spec, preprocess, tokenizer, per_rank)
    else:
        mine = shards[spec.rank::spec.world_size]
        workers = min(spec.workers, len(mine))  # an idle worker would only cost start-up time
        num_batches = _val_batches(mine, sizes, spec.batch_size, max(1, workers))
        stream = ShardStream(shards, spec, preprocess, tokenizer, None)

    generator = torch.Generator()

    reseed(generator, spec.seed, "loader", spec.rank)  # not torch's global one (seeding.py)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, generator=generator,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    return DataInfo(Loader(loader, num_batches, name), num_samples, num_batches, stream.set_epoch)


def _val_batches(mine: list[str], sizes: dict[str, int], batch_size: int, workers: int) -> int | None:
    """Batches when each worker reads its shards once (each ends on a partial batch), if sizes are known."""
    if not all(s in sizes for s in mine):
        return None
    return sum(math.ceil(sum(sizes[s] for s in mine[w::workers]) / batch_size) for w in range(workers))
