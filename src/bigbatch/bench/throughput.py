"""The step throughput study: steps interleaved, one of each configuration per round and
the order rotated every round (ABC, BCA, CAB, ...), so a change in machine load hits all
of them alike; medians, and each configuration's ratio to plain taken round by round."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from bigbatch.bench.environment import free_cuda, load_average, synchronize
from bigbatch.bench.setups import ACCUM, PEER, PLAIN, PLAIN_MICRO, Setup


def time_interleaved(setups: list[Setup], rounds: int, warmup: int, device: torch.device,
                     log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Seconds per step of each setup, rounds interleaved with a rotating order."""
    times: dict[str, list[float]] = {s.name: [] for s in setups}
    for r in range(warmup + rounds):
        order = setups[r % len(setups):] + setups[:r % len(setups)]
        for setup in order:
            if setup.extra.get("error"):
                continue
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            try:
                setup.step(r)
            except torch.OutOfMemoryError:  # it fit alone, not beside the others' copies
                setup.extra["error"] = "out of memory beside the other configurations"
                log(f"  {setup.name}: {setup.extra['error']}")
                setup.model = setup.optimizer = setup.step = None
                free_cuda()
                continue
            synchronize(device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[setup.name].append(elapsed)
        if r == warmup - 1 or (r >= warmup and (r - warmup + 1) % max(1, rounds // 5) == 0):
            done = "warm-up done" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            log(f"  {done}: " + ", ".join(f"{s.name} {times[s.name][-1]:.3f}s" if times[s.name] else s.name
                                          for s in setups) + f"  load {load_average()}")
    return times


def summarize(times: dict[str, list[float]], global_batch: int) -> dict[str, dict]:
    summary = {}
    plain = times.get(PLAIN)
    for name, seconds in times.items():
        rates = [global_batch / t for t in seconds]
        entry = {"seconds_per_step": [round(t, 5) for t in seconds],
                 "samples_per_s": [round(r, 3) for r in rates],
                 "median_seconds_per_step": statistics.median(seconds),
                 "median_samples_per_s": statistics.median(rates)}
        for key, base in (("ratio_to_plain", plain), ("ratio_to_plain_micro", times.get(PLAIN_MICRO))):
            if base:  # both steps take the same samples: time of the base / time of this
                paired = [p / t for p, t in zip(base, seconds)]
                entry[f"{key}_paired"] = [round(x, 4) for x in paired]
                entry[key] = statistics.median(paired)
                entry[f"{key}_q1_q3"] = quartiles(paired)
        summary[name] = entry
    if ACCUM in times and PEER in times:
        paired = [p / a for a, p in zip(times[ACCUM], times[PEER])]
        summary[ACCUM]["speedup_vs_peer"] = statistics.median(paired)
        summary[ACCUM]["speedup_vs_peer_paired"] = [round(x, 4) for x in paired]
        summary[ACCUM]["speedup_vs_peer_q1_q3"] = quartiles(paired)
    return summary


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 4), round(q[2], 4)]

