"""The loss working-set study: one CLIP loss forward + backward over N x N features, plain
and tiled: measured up to --loss-measure-max, and always the analytic count
(`tiled.loss_working_set_bytes`) beside it."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch

from bigbatch import tiled
from bigbatch.bench.environment import free_cuda, synchronize
from bigbatch.bench.report import mib
from bigbatch.losses import ClipLoss
from bigbatch.memory import MemoryMeter, storage_keys


@contextlib.contextmanager
def untiled_loss():
    """Force the plain (N, N) logits: ClipLoss(tile_size=None) tiles by itself above
    tiled.PLAIN_MAX_LOGITS, which would hide the quadratic working set being measured."""
    saved = tiled.PLAIN_MAX_LOGITS
    tiled.PLAIN_MAX_LOGITS = float("inf")
    try:
        yield
    finally:
        tiled.PLAIN_MAX_LOGITS = saved


def loss_working_set(sizes: list[int], dim: int, tile: int | None, measure_max: int,
                     device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Peak bytes of one CLIP loss forward + backward over N x N, plain and tiled."""
    tile = tile or tiled.DEFAULT_TILE
    rows = []
    for n in sizes:
        row: dict = {"N": n, "D": dim}
        for variant in ("plain", "tiled"):
            is_tiled = variant == "tiled"
            entry: dict = {"analytic_bytes": tiled.loss_working_set_bytes(n, n, dim, tile, is_tiled)}
            if n <= measure_max:
                try:
                    entry.update(_measure_loss(n, dim, tile if is_tiled else None, device))
                    entry["source"] = "measured"
                except torch.OutOfMemoryError:
                    entry["measure_error"] = "out of memory"
                    free_cuda()
                except Exception as error:  # a loss in progress elsewhere must not stop the bench
                    entry["measure_error"] = f"{type(error).__name__}: {error}"
            entry.setdefault("source", "analytic")
            row[variant] = entry
            shown = entry.get("measured_bytes", entry["analytic_bytes"])
            log(f"  loss N={n} {variant}: {mib(shown)} MiB ({entry['source']}"
                + (f", analytic {mib(entry['analytic_bytes'])}" if entry["source"] == "measured" else "")
                + (f", {entry['seconds']}s" if "seconds" in entry else "") + ")")
        rows.append(row)
    return {"tile": tile, "rows": rows,
            "metric": ("measured_bytes: CUDA max_memory_allocated during the call over the baseline "
                       "(the input features)" if device.type == "cuda" else
                       "measured_bytes: CPU peak of all tensors made during the call (TorchDispatchMode), "
                       "feature gradients included; saved_plus_largest_bytes: peak saved-for-backward "
                       "bytes + the largest single temporary")
                      + "; analytic_bytes: loss_working_set_bytes(N, N, D, tile, tiled), which counts "
                        "the same things"}


def _measure_loss(n: int, dim: int, tile: int | None, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(n)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    loss_fn = ClipLoss(tile_size=tile) if tile else ClipLoss()
    exclude = storage_keys(images, texts, logit_scale)
    if device.type == "cuda":
        free_cuda()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with (untiled_loss() if tile is None else contextlib.nullcontext()):
        with MemoryMeter(exclude, track_live=device.type != "cuda") as meter:
            loss = loss_fn(image_features=images, text_features=texts, logit_scale=logit_scale)
            loss.backward()
            del loss
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 3), **meter.result()}
    if device.type == "cuda":
        result["measured_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        result["measured_bytes"] = result["live_peak_bytes"]
        result["saved_plus_largest_bytes"] = result["saved_peak_bytes"] + result["largest_tensor_bytes"]
    del images, texts, logit_scale
    return result
