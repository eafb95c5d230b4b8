"""The loader handed to the train loop: a DataLoader with a length, skips reported once, ranks
that stop together, and clean failures."""

from __future__ import annotations

import atexit
import logging
import weakref
from collections import Counter
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .batch import Batch
from .samples import DataError

log = logging.getLogger("bigbatch")

NAMED_PER_EPOCH = 20  # bad samples named in the log per epoch; the rest are counted only
_open = weakref.WeakSet()  # loaders whose workers may be alive, closed at exit (see Loader.close)


class Loader:
    """Iterate a DataLoader of ``Batch``es; ``len()`` is the number of batches per epoch.

    A batch without images (a worker's skips met after its last batch, a validation batch of
    bad rows only) passes its counts on to a neighbour, so each skip is reported exactly once.
    ``synced``: the ranks stop together, at the first rank that runs out (a bad sample can
    cost a rank a batch); the others' remaining samples are counted as left over and reported.
    """

    def __init__(self, dataloader: DataLoader, num_batches: int | None, name: str, synced: bool = False):
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.name = name  # how the user named the data, e.g. "--train-data 'x/{0..3}.tar'"
        self.synced = synced
        self.left_over = 0  # samples of the last epoch not trained: another rank had run out
        _open.add(self)

    def close(self) -> None:
        """End the worker processes now (a later epoch starts new ones).

        The workers ignore SIGTERM (the trainer stops them, see shield_loader_worker), and
        multiprocessing's exit handler ends child processes with SIGTERM and then waits for
        them: a process leaving with a live iterator, as a traceback keeps one, would wait
        forever. So every loader is closed at exit, before that handler runs."""
        iterator = getattr(self.dataloader, "_iterator", None)  # persistent workers live there
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.dataloader._iterator = None

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the number of batches of {self.name} is unknown")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        count, named, stopped = 0, 0, False
        held, carried, bad = None, Counter(), []
        batches = self._batches()
        for batch in batches:
            carried.update(batch.skipped)
            bad.extend(batch.bad)
            if batch.images is None:
                continue
            if not self._all_ranks_have_one():
                self._leave(batch, batches, carried)
                stopped = True
                break
            if held is not None:  # one batch is held back, for the skips met after the last one
                named = self._name_bad(held.bad, named)
                count += 1
                yield held
            held, carried, bad = batch._replace(skipped=dict(carried), bad=tuple(bad)), Counter(), []
        if not stopped:
            self._all_ranks_have_one(False)
        if held is not None:
            held = held._replace(skipped=dict(Counter(held.skipped) + carried), bad=held.bad + tuple(bad))
            self._name_bad(held.bad, named)
            count += 1
            yield held
        if count == 0 and self.num_batches != 0:  # 0: this rank was planned no data (val)
            raise DataError(f"{self.name} gave no batch this epoch: every sample was skipped as "
                            "bad data or the shards are empty (see the warnings above)")

    def _batches(self) -> Iterator[Batch]:
        self.left_over = 0
        try:
            yield from self.dataloader
        except DataError as error:
            raise DataError(str(error)) from None  # drop the DataLoader's worker traceback

    def _all_ranks_have_one(self, mine: bool = True) -> bool:
        """Whether every rank has a batch to train (one tiny collective per batch)."""
        if not self.synced or not dist.is_initialized():
            return mine
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(mine)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _leave(self, batch: Batch, rest: Iterator[Batch], carried: Counter) -> None:
        """Another rank ran out: count what this one had left, rather than train it alone."""
        self.left_over = len(batch.images)
        for b in rest:
            carried.update(b.skipped)
            self.left_over += 0 if b.images is None else len(b.images)
        log.warning(f"{self.left_over} samples of {self.name} left over this epoch on rank "
                    f"{dist.get_rank()}: another rank ran out first (ranks step together)")

    def _name_bad(self, bad: tuple[str, ...], named: int) -> int:
        for line in bad:
            if named < NAMED_PER_EPOCH:
                log.warning(f"skipped {line}")
            elif named == NAMED_PER_EPOCH:
                log.warning(f"more bad samples in {self.name}: counted, not named")
            named += 1
        return named


@atexit.register  # registered after multiprocessing's handler, so it runs before it
def _close_open_loaders() -> None:
    for loader in list(_open):
        loader.close()
