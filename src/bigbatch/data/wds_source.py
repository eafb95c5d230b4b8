"""Webdataset shards -> ``Batch``es, split across ranks and workers, shuffled from (seed, epoch).

Training, per DataLoader worker:

1. An epoch reads every shard once: ``epochs.plan_epoch`` deals the shards (shuffled with
   (seed, epoch), identically on every rank) to ranks and workers by their sample counts,
   and gives each worker its batch sizes, so that every rank yields the same number of
   batches. Nothing is dropped or repeated; a worker's last batches are simply smaller.
   With ``resampled`` a worker instead draws shards with replacement until its quota
   (``num_samples`` dealt out in whole batches) is filled.
2. A worker streams its shards through a shuffle buffer of raw bytes (seeded per rank,
   worker and epoch), then decodes and preprocesses; bad samples are skipped and counted
   once, by reason, and named in ``Batch.bad``. Augmentations are seeded per sample
   (seed, epoch, shard file name, key), in their own random stream: the same for any --workers,
   and never drawn from the trainer's stream (--workers 0).
3. A resumed epoch (``skip_batches``) leaves out the rank's first batches: each worker
   builds and drops its share of them in the DataLoader's order (``epochs.delivered``),
   so its shuffle continues exactly as in an uninterrupted run, and the workers' roles
   rotate so that batches still arrive in the same order.

Validation reads this rank's shards once, in order. With ``resampled``, a shard that gives
no usable sample is not drawn again; when none is usable the loader fails with a ``DataError``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import posixpath
from collections import Counter
from itertools import count, islice
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigbatch.preemption import shield_loader_worker

from .batch import Batch, Tokenizer, collate
from .epochs import WorkerPlan, delivered, plan_epoch, split
from .loader import Loader
from .samples import CORRUPT_SHARD, BadSample, DataError, Preprocess, Sample, load_image
from .seeding import augment_stream, make_rng, reseed
from .shards import CorruptShard, check_shards, count_samples, parse_sample, probe_shards, read_shard, shard_sizes
from .spec import DataInfo, DataSpec, expand_paths, is_local, location, shard_weights

SHUFFLE_BUFFER = 2000  # raw samples held per worker for shuffling
SHUFFLE_INITIAL = 500  # samples buffered before the first one leaves

# (url:key for messages, shard-file-name:key for seeding, encoded image, caption, label)
Parsed = tuple[str, str, bytes, str, int | None]


class ShardStream(IterableDataset):
    """Yields the ``Batch``es of one rank's worker (see the module docstring)."""

    def __init__(self, shards: list[str], spec: DataSpec, preprocess: Preprocess, tokenizer: Tokenizer,
                 sizes: dict[str, int], workers: int, take: int | None = None, quota: int | None = None):
        super().__init__()
        self.shards, self.spec, self.sizes, self.workers = shards, spec, sizes, max(1, workers)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.take = take  # samples an epoch reads (--train-num-samples below the data's size)
        self.quota = quota  # resampled: samples per rank and epoch
        # shared memory, so that set_epoch in the main process reaches persistent workers
        self.epoch = multiprocessing.Value("q", 0)
        self.skip_batches = multiprocessing.Value("q", 0)
        # per process from here on: each worker has its own copy
        self.pending: Counter = Counter()  # skips not yet reported in a batch
        self.pending_bad: list[str] = []
        self.total: Counter = Counter()
        self.last_problem = ""
        self.dead: set[str] = set()  # resampled: shards that gave no usable sample
        weights = shard_weights(spec.paths, spec.upsampling_factors)
        self.weights = dict(zip(shards, weights)) if weights else None  # resampled: shares of the draws

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch.value, self.skip_batches.value = epoch, skip_batches

    def plans(self, epoch: int) -> list[WorkerPlan]:
        """This rank's workers' plans for ``epoch``."""
        spec, workers = self.spec, self.workers
        if not spec.is_train:
            mine = self.shards[spec.rank::spec.world_size]
            return [WorkerPlan(mine[w::workers], [], 0) for w in range(workers)]
        if self.quota is not None:
            return [WorkerPlan([], split(n, math.ceil(n / spec.batch_size)), n)
                    for n in self._quotas(self.quota, workers)]
        return plan_epoch(self.shards, self.sizes, epoch=epoch, seed=spec.seed, world_size=spec.world_size,
                          workers=workers, batch_size=spec.batch_size, take=self.take)[spec.rank]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        process = info.id if info else 0
        epoch, skip = self.epoch.value, self.skip_batches.value
        plans = self.plans(epoch)
        taken, first = delivered([len(p.batch_sizes) for p in plans], skip)
        worker = (process + first) % self.workers  # the DataLoader asks process 0 first
        plan = plans[worker]
        if not self.spec.is_train:
            samples = self._decode(self._read(plan.shards), epoch)
        elif self.quota is not None:
            samples = islice(self._decode(self._resampled(epoch, worker), epoch), plan.samples)
        else:
            rng = make_rng(self.spec.seed, epoch, self.spec.rank, worker)
            raw = wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, rng=rng)(self._read(plan.shards))
            samples = self._decode(raw, epoch) if self.take is None else islice(self._decode(raw, epoch), plan.samples)
        yield from islice(self._batches(samples, plan.batch_sizes), taken[worker], None)
        if self.pending:  # met after the last batch, with no batch left to carry them
            yield Batch(None, None, None, dict(self.pending), tuple(self.pending_bad))
            self.pending, self.pending_bad = Counter(), []

    def _batches(self, samples: Iterator[Sample], sizes: list[int]) -> Iterator[Batch]:
        """Batches of the planned sizes, then (more samples than planned: a stale sizes.json,
        or validation) of --batch-size, carrying the skips met while they were built."""
        sizes = iter(sizes)
        batch: list[Sample] = []
        size = next(sizes, self.spec.batch_size)
        for sample in samples:
            batch.append(sample)
            if len(batch) == size:
                yield self._collate(batch)
                batch, size = [], next(sizes, self.spec.batch_size)
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: list[Sample]) -> Batch:
        skipped, bad = self.pending, tuple(self.pending_bad)
        self.pending, self.pending_bad = Counter(), []
        return collate(batch, self.tokenizer, skipped)._replace(bad=bad)

    def _quotas(self, per_rank: int, workers: int) -> list[int]:
        """Resampled: the rank's samples in whole batches dealt round-robin to the workers;
        the worker that yields the rank's last batch gives it short."""
        size = self.spec.batch_size
        batches = math.ceil(per_rank / size)
        quotas = [(batches // workers + (w < batches % workers)) * size for w in range(workers)]
        quotas[(batches - 1) % workers] -= batches * size - per_rank
        return quotas

    def _resampled(self, epoch: int, worker: int) -> Iterator[Parsed]:
        """Shards drawn with replacement, endlessly, each through its own shuffle buffer."""
        spec = self.spec
        rng = make_rng(spec.seed, epoch, spec.rank, worker, "shards")
        for n in count():
            live = [s for s in self.shards if s not in self.dead]
            if not live:
                raise DataError(
                    f"no usable sample in any of the {len(self.shards)} shards of {spec.flag} {spec.paths!r} "
                    f"(skipped: {dict(self.total)}; last: {self.last_problem}): fix the data or the path")
            weights = [self.weights[s] for s in live] if self.weights else None
            if weights and any(weights):
                shards = rng.choices(live, weights=weights, k=len(self.shards))
            else:
                shards = [rng.choice(live) for _ in self.shards]
            buffer_rng = make_rng(spec.seed, epoch, spec.rank, worker, n)
            yield from wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, rng=buffer_rng)(self._read(shards))

    def _read(self, shards: Iterable[str]) -> Iterator[Parsed]:
        for url in shards:
            yield from self._read_shard(url)

    def _read_shard(self, url: str) -> Iterator[Parsed]:
        """The well-formed samples of one shard; counts the rest, marks the shard if none is."""
        usable = False
        # augmentations are seeded by the shard's file name, not the path or URL it is read
        # through: a moved data set, a pipe: command or an fsspec URL augment alike
        shard = posixpath.basename(location(url))
        try:
            for raw in read_shard(url):
                where = f"{url}:{raw['__key__']}"
                try:
                    image, caption, label = parse_sample(raw, self.spec)
                except BadSample as bad:
                    self._skip(bad, where)
                    continue
                usable = True
                yield where, f"{shard}:{raw['__key__']}", image, caption, label
        except CorruptShard as error:
            self._skip(BadSample(CORRUPT_SHARD, str(error)), url)
        if not usable:
            self.dead.add(url)

    def _decode(self, parsed: Iterator[Parsed], epoch: int) -> Iterator[Sample]:
        for where, name, image, caption, label in parsed:
            try:
                with augment_stream(self.spec.seed, "augment", epoch, name):
                    tensor = load_image(image, self.preprocess)
            except BadSample as bad:
                self._skip(bad, where)
                continue
            yield Sample(tensor, caption, label)  # outside the stream: the consumer draws on its own

    def _skip(self, bad: BadSample, where: str) -> None:
        self.pending[bad.reason] += 1
        self.pending_bad.append(f"{where}: {bad}")
        self.total[bad.reason] += 1
        self.last_problem = f"{where}: {bad}"


def make_webdataset_data(spec: DataSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> DataInfo:
    """Batches from webdataset shards (see the module docstring)."""
    shards = expand_paths(spec.paths)
    check_shards(shards, spec)
    probe_shards(shards, spec, preprocess)
    name = f"{spec.flag} {spec.paths!r}"
    sizes = shard_sizes(shards)
    if spec.is_train and not spec.resampled and len(sizes) < len(shards):
        sizes = _count_missing(shards, sizes, spec)
    known = sum(sizes.values()) if len(sizes) == len(shards) else None

    if not spec.is_train:
        mine = shards[spec.rank::spec.world_size]
        workers = min(spec.workers, len(mine))  # an idle worker would only cost start-up time
        num_batches = _val_batches(mine, sizes, spec.batch_size, max(1, workers))
        stream = ShardStream(shards, spec, preprocess, tokenizer, sizes, workers)
        num_samples = spec.num_samples or known
    elif spec.resampled:
        workers = spec.workers
        num_samples = spec.num_samples or known
        if num_samples is None:
            raise ValueError(f"cannot tell how many samples {name} holds (no sizes.json or _info.json "
                             f"next to the shards lists them all): pass {spec.num_samples_flag}")
        per_rank = math.ceil(num_samples / spec.world_size)
        num_batches, num_samples = math.ceil(per_rank / spec.batch_size), per_rank * spec.world_size
        stream = ShardStream(shards, spec, preprocess, tokenizer, sizes, workers, quota=per_rank)
    else:
        workers = spec.workers
        take = _share(spec, known, name)
        stream = ShardStream(shards, spec, preprocess, tokenizer, sizes, workers, take=take)
        plans = plan_epoch(shards, sizes, epoch=0, seed=spec.seed, world_size=spec.world_size,
                           workers=max(1, workers), batch_size=spec.batch_size, take=take)
        num_batches = max(sum(len(p.batch_sizes) for p in rank) for rank in plans)
        num_samples = sum(p.samples for rank in plans for p in rank)
        if num_batches == 0:
            raise ValueError(f"{name} holds no samples (per sizes.json): check the data")

    generator = reseed(torch.Generator(), spec.seed, "loader", spec.rank)  # not torch's global one
    loader = DataLoader(stream, batch_size=None, num_workers=workers, generator=generator,
                        persistent_workers=workers > 0, prefetch_factor=spec.prefetch_factor(workers),
                        pin_memory=torch.cuda.is_available(),
                        worker_init_fn=shield_loader_worker)  # SLURM's SIGTERM is the trainer's
    synced = spec.is_train and spec.world_size > 1
    return DataInfo(Loader(loader, num_batches, name, synced=synced), num_samples, num_batches, stream.set_epoch)


def _count_missing(shards: list[str], sizes: dict[str, int], spec: DataSpec) -> dict[str, int]:
    """An epoch is planned by the shards' sample counts: count the local shards sizes.json does not list
    (from their headers); a pipe: or remote shard would have to be read whole, so say how to give its count."""
    remote = [s for s in shards if s not in sizes and not is_local(s)]
    if remote:
        where = location(remote[0])
        beside = posixpath.join(posixpath.dirname(where), "sizes.json")
        raise ValueError(f"{spec.flag}: no sizes.json lists shard {posixpath.basename(where)!r} of {remote[0]!r}, "
                         f"and an epoch that reads every sample once needs each shard's count: write {beside} "
                         f"({{\"{posixpath.basename(where)}\": samples, ...}}) or pass --dataset-resampled with "
                         f"{spec.num_samples_flag}")
    logging.getLogger("bigbatch").info(f"counting the samples of {len(shards) - len(sizes)} shards "
                                       "(a sizes.json beside them saves this)")
    return {s: sizes[s] if s in sizes else count_samples(s) for s in shards}


def _share(spec: DataSpec, known: int, name: str) -> int | None:
    """The samples an epoch reads: --train-num-samples below the data's size takes part of
    each worker's shards; above it, the data is read once (said, not repeated)."""
    if spec.num_samples is None or spec.num_samples == known:
        return None
    if spec.num_samples > known:
        logging.getLogger("bigbatch").warning(
            f"{spec.num_samples_flag} {spec.num_samples} is more than the {known} samples of {name}: "
            f"an epoch trains each of the {known} once (--dataset-resampled draws with replacement)")
        return None
    return spec.num_samples


def _val_batches(mine: list[str], sizes: dict[str, int], batch_size: int, workers: int) -> int | None:
    """Batches when each worker reads its shards once (each ends on a partial batch), if sizes are known."""
    if not all(s in sizes for s in mine):
        return None
    return sum(math.ceil(sum(sizes[s] for s in mine[w::workers]) / batch_size) for w in range(workers))
