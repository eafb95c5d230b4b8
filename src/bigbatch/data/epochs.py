"""The epoch plan of webdataset shards: which worker of which rank reads which shards, and
in how many batches of which sizes.

Every shard is read once per epoch. Shards are dealt by their sample counts, largest first,
each to the rank (then the worker) holding the fewest samples so far: ranks end up nearly
even. Ranks must take the same number of batches (every step gathers from all of them), so
a rank with fewer batches splits some of its batches in two (any micro-batch size is exact
in the engine) rather than repeat samples. The DataLoader takes the workers' batches in turn,
skipping a worker that has finished; ``delivered`` replays that order for a resumed epoch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .seeding import make_rng


class WorkerPlan(NamedTuple):
    shards: list[str]
    batch_sizes: list[int]  # the worker's batches, in order
    samples: int  # planned samples (the sum of batch_sizes)


def deal(sizes: list[int], bins: int) -> list[list[int]]:
    """Indices into ``sizes``, dealt largest first to the bin with the fewest samples;
    each bin keeps the given order (ties: the earlier index, the lower bin)."""
    loads, dealt = [0] * bins, [[] for _ in range(bins)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = min(range(bins), key=lambda b: (loads[b], len(dealt[b])))
        loads[b] += sizes[i]
        dealt[b].append(i)
    return [sorted(d) for d in dealt]


def split(n: int, k: int) -> list[int]:
    """``n`` samples in ``k`` batches whose sizes differ by at most one, larger first."""
    return [n // k + (i < n % k) for i in range(k)]


def plan_epoch(shards: list[str], sizes: dict[str, int], *, epoch: int, seed: int, world_size: int,
               workers: int, batch_size: int, take: int | None = None) -> list[list[WorkerPlan]]:
    """``plan[rank][worker]`` for one epoch; ``take``: only so many samples, a proportional
    share of each worker's."""
    order = list(shards)
    make_rng(seed, epoch).shuffle(order)  # the same on every rank
    ranks = [[order[i] for i in d] for d in deal([sizes[s] for s in order], world_size)]
    counts, shares = [], []
    for mine in ranks:
        dealt = [[mine[i] for i in d] for d in deal([sizes[s] for s in mine], workers)]
        shares.append(dealt)
        counts.append([sum(sizes[s] for s in d) for d in dealt])
    if take is not None:
        counts = _shares(counts, take)
    batches = [[math.ceil(n / batch_size) for n in rank] for rank in counts]
    target = max(sum(b) for b in batches)
    for rank_counts, rank_batches in zip(counts, batches):
        _add_batches(rank_counts, rank_batches, target - sum(rank_batches))
    return [[WorkerPlan(d, split(n, k), n) for d, n, k in zip(dealt, c, b)]
            for dealt, c, b in zip(shares, counts, batches)]


def _shares(counts: list[list[int]], take: int) -> list[list[int]]:
    """``take`` samples shared out in proportion to ``counts`` (largest remainders first)."""
    flat = [n for rank in counts for n in rank]
    exact = [n * take / sum(flat) for n in flat]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(flat)), key=lambda i: shares[i] - exact[i])[:take - sum(shares)]:
        shares[i] += 1
    it = iter(shares)
    return [[next(it) for _ in rank] for rank in counts]


def _add_batches(counts: list[int], batches: list[int], missing: int) -> None:
    """Split batches of the workers with the largest ones until the rank has ``missing`` more
    (fewer if it has too few samples: the ranks then stop at the shortest, see Loader)."""
    for _ in range(missing):
        w = max(range(len(counts)), key=lambda w: counts[w] / max(batches[w], 1))
        if counts[w] <= batches[w]:
            return
        batches[w] += 1


def delivered(batches: list[int], skip: int) -> tuple[list[int], int]:
    """After the DataLoader took ``skip`` batches from workers holding ``batches`` each, in
    turn: how many it took from each, and the worker it asks next."""
    taken, worker = [0] * len(batches), 0
    while skip > 0 and any(t < b for t, b in zip(taken, batches)):
        if taken[worker] < batches[worker]:
            taken[worker] += 1
            skip -= 1
        worker = (worker + 1) % len(batches)
    return taken, worker
