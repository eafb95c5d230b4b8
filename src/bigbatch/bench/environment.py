"""Where a benchmark ran: the device, the versions, the machine's load."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def versions() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "open_clip_torch": version("open_clip_torch"), "bigbatch": version("bigbatch"),
            "bigbatch_commit": commit, "cuda": torch.version.cuda}


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def wait_for_quiet(max_seconds: float, threshold: float) -> dict:
    """Poll the 1-minute load average until it is below `threshold` or time runs out."""
    start = time.monotonic()
    load = load_average()
    while load and load[0] >= threshold and time.monotonic() - start < max_seconds:
        time.sleep(min(15.0, max_seconds))
        load = load_average()
    return {"waited_s": round(time.monotonic() - start, 1), "load_at_start": load,
            "quiet": bool(load and load[0] < threshold)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

