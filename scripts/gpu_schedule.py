"""How scripts/gpu_check.py shares one GPU among its parts, so that the check fits its minutes.

A part whose figures are times, or where the card's memory runs out, has the device to
itself ("alone"). A part whose figures are its own process's peak memory or a pass/fail
(the tests, the planner against measured peaks, the capped and the largest step, compile's
compiling) may share it: such parts run side by side, packed into groups whose declared
peaks fit the card, so that one part's start-up, model building, compiling and host work
hide under another's kernels. Kernels of two processes take turns on a GPU, so the device
work of a group adds up; what overlaps is everything else.

An advisory lock on OUT_DIR/.device-lock enforces it whatever the order: an alone part holds
it exclusively, a shared part shared; a shared part that needs the device to itself for a
moment (compile's timing) converts its hold to an exclusive one and waits for the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SHARE = 0.9  # of the card's memory the declared peaks of a group may add up to
BUSY = "busy or unavailable"  # CUDA's words when the card admits one process only


class DeviceLock:
    """A part's hold on the device: shared or exclusive (an advisory flock)."""

    def __init__(self, handle, exclusive: bool):
        self.handle, self.exclusive = handle, exclusive
        self.exclusive_since: float | None = time.time() if exclusive else None
        self.releasing_at: float | None = None

    def make_exclusive(self) -> float:
        """Wait until no other part holds the device; the seconds waited."""
        start = time.time()
        if not self.exclusive:
            fcntl.flock(self.handle, fcntl.LOCK_EX)  # drops the shared hold first, then waits
            self.exclusive, self.exclusive_since = True, time.time()
        return time.time() - start


@contextlib.contextmanager
def device_lock(out: Path, exclusive: bool):
    with open(out / ".device-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        lock = DeviceLock(handle, exclusive)
        try:
            yield lock
        finally:
            lock.releasing_at = time.time()  # before the release: no other hold starts earlier
            fcntl.flock(handle, fcntl.LOCK_UN)


def pack(parts: list[str], peaks: dict[str, float], device_gib: float | None) -> list[list[str]]:
    """Groups of shared parts to run side by side: largest declared peak first, each into the
    first group it fits beside (first-fit decreasing). device_gib None: one at a time."""
    if device_gib is None:
        return [[p] for p in parts]
    together: list[list[str]] = []
    for part in sorted(parts, key=lambda p: -peaks[p]):
        fits = [g for g in together if sum(peaks[q] for q in g) + peaks[part] <= SHARE * device_gib]
        if fits:
            fits[0].append(part)
        else:
            together.append([part])
    return together


def sharing_memory_gib(known_gib: float | None, python: str) -> float | None:
    """The card's memory for packing (asked of a child process if not known: the driver
    stays off the GPU); None when the card takes one process at a time (exclusive compute
    mode) or cannot be asked."""
    try:
        mode = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout
        if "exclusive" in mode.lower():
            return None
    except (OSError, subprocess.TimeoutExpired):
        pass  # no nvidia-smi: a busy card is caught when a part says so
    if known_gib:
        return known_gib
    ask = "import torch; print(torch.cuda.get_device_properties(0).total_memory / 1024 ** 3)"
    try:
        return float(subprocess.run([python, "-c", ask], capture_output=True, text=True, timeout=120).stdout)
    except (ValueError, subprocess.TimeoutExpired):
        return None


def run_group(commands: dict[str, list[str]], timeouts: dict[str, float], deadline: float,
              cwd: Path) -> dict[str, dict]:
    """Start every command at once, each in a session of its own; stop one (and its children)
    at its timeout or the deadline. Per part: start and end times and why it was stopped.
    However this returns (an error, the driver stopped), no part outlives it."""
    running, done = {}, {}
    try:
        for name, command in commands.items():
            running[name] = (subprocess.Popen(command, cwd=cwd, start_new_session=True), time.time())
        while running:
            time.sleep(0.2)
            for name, (proc, start) in list(running.items()):
                stopped = None
                if proc.poll() is None:
                    if time.time() - start > timeouts[name]:
                        stopped = f"stopped at its {timeouts[name]:.0f}s budget"
                    elif time.time() > deadline:
                        stopped = "stopped at the check's time limit (--total)"
                    else:
                        continue
                    kill(proc)
                done[name] = {"start": start, "end": time.time(), "stopped": stopped}
                del running[name]
    finally:
        for proc, _ in running.values():
            kill(proc)
    return done


def kill(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """The part and whatever it started (pytest, bench_e2e.py, inductor's compile workers):
    SIGTERM, a grace period, then SIGKILL to the whole group (children that ignore SIGTERM,
    or outlive their parent); the part reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def said_busy(result: dict) -> bool:
    """Whether a part failed because the card would not take a second process."""
    return BUSY in json.dumps(result, default=str)


if __name__ == "__main__":
    sys.exit("scripts/gpu_schedule.py is used by scripts/gpu_check.py")
