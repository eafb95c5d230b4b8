"""What a run tells the person watching it: progress lines, a JSONL log, tensorboard.

Only the main process (rank 0) writes; other ranks get a RunLog whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from bigbatch.errors import ConfigError

log = logging.getLogger("bigbatch")


def setup_console_logging(log_file: Path | None = None, enabled: bool = True,
                          debug: bool = False) -> None:
    """Progress to stdout (and a file in the run folder), one line per message."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.WARNING if not enabled else logging.DEBUG if debug else logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


def note_in_log_file(message: str) -> None:
    """A line for out.log alone: how the run ended (the command line prints it itself)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None))


def close_log_file() -> None:
    """Detach out.log when a run ends, so nothing later in this process writes to it."""
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        handler.close()
        log.removeHandler(handler)


class RunLog:
    """Step and validation records: printed, appended to metrics.jsonl, sent to tensorboard."""

    def __init__(self, run_dir: Path | None, *, total_steps: int, tensorboard: bool = False,
                 device: torch.device = torch.device("cpu"), wandb_run=None):
        self.jsonl = run_dir / "metrics.jsonl" if run_dir else None
        self.total_steps = total_steps
        self.device = device
        self.skipped: Counter[str] = Counter()
        self.writer = None
        if tensorboard and run_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = wandb_run if run_dir else None
        self._window_start = time.perf_counter()
        self._window = Counter()  # samples, data seconds since the last progress line
        self._session: tuple[float, int] | None = None  # (time, step) of this process's first step
        self._pauses = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time outside the steps (evaluation, checkpoints) stays out of samples/s and the
        data share; the ETA, an average over the whole session, keeps it (it recurs)."""
        self._pauses += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._pauses -= 1
            if not self._pauses:  # nested: the outermost pause alone shifts the window
                self._window_start += time.perf_counter() - start

    def count_skipped(self, skipped: dict[str, int]) -> None:
        self.skipped.update(skipped)

    def train_step(self, *, step: int, epoch: int, loss: float | torch.Tensor, lr: float,
                   samples: int, data_seconds: float, print_now: bool,
                   extra: dict[str, float] | None = None) -> None:
        """`samples`: this step's, over all ranks (its effective batch). A tensor loss is read
        only when the line is printed: a host sync on GPU."""
        self._window.update(samples=samples, data_seconds=data_seconds, steps=1)
        if self._session is None:  # from the end of the first step: its start-up is not a rate
            self._session = (time.perf_counter(), step)
            if not print_now:  # the first line's samples/s: the steps after it
                self._window.clear()
                self._window_start = self._session[0]
        if not print_now:
            return
        loss = float(loss)
        now = time.perf_counter()
        elapsed = now - self._window_start
        rate = self._window["samples"] / elapsed
        record = dict(kind="train", step=step, epoch=epoch, loss=loss, lr=lr,
                      samples_per_second=rate, effective_batch=samples,
                      data_fraction=self._window["data_seconds"] / elapsed,
                      peak_memory_gib=peak_memory_gib(self.device), **(extra or {}))
        if self.skipped:  # bad training samples so far, by reason
            record["skipped"] = dict(self.skipped)
        eta = (self.total_steps - step) * self._seconds_per_step(now, step, elapsed)
        skipped = sum(self.skipped.values())
        nonfinite = record.get("nonfinite_steps", 0)
        log.info(
            f"epoch {epoch} step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) | "
            f"loss {loss:.4f} | lr {lr:.2e} | {rate:.0f} samples/s | batch {samples} | "
            f"data {100 * record['data_fraction']:.0f}% | mem {record['peak_memory_gib']:.2f} GiB | "
            f"ETA {format_duration(eta)}" + (f" | skipped {skipped}" if skipped else "")
            + (f" | non-finite steps {nonfinite}" if nonfinite else ""))
        self._write(record, step)
        self._window.clear()
        self._window_start = time.perf_counter()

    def _seconds_per_step(self, now: float, step: int, window_seconds: float) -> float:
        """Averaged over the session (pauses included): one slow window does not swing it."""
        start, first_step = self._session
        if step > first_step:
            return (now - start) / (step - first_step)
        return window_seconds / max(self._window["steps"], 1)

    def validation(self, *, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        self._write(dict(kind="val", step=step, epoch=epoch, **metrics), step)

    def report_skipped(self) -> None:
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
            log.warning(f"skipped {sum(self.skipped.values())} bad training samples so far ({reasons})")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()

    def _write(self, record: dict[str, Any], step: int) -> None:
        if self.jsonl:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log({f"{record['kind']}/{key}": value for key, value in record.items()
                            if isinstance(value, (int, float)) and key not in ("kind", "step")},
                           step=step)
        if self.writer:
            prefix = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
                elif isinstance(value, dict):  # skipped samples, by reason
                    for name, count in value.items():
                        self.writer.add_scalar(f"{prefix}/{key}/{name}", count, step)


def start_wandb(run_dir: Path, *, project: str, name: str, notes: str, config: dict):
    """A Weights & Biases run named and identified as the run folder, its files in RUN/wandb
    (WANDB_MODE=offline: no network; `wandb sync` uploads them later); resumed with it."""
    import wandb
    try:
        return wandb.init(project=project, name=name, id=name, notes=notes, config=config,
                          dir=str(run_dir), resume="allow")
    except Exception as error:  # no login, no network, a bad setting: wandb raises many types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"--report-to wandb: wandb could not start ({type(error).__name__}: {first}): "
                          f"log in (wandb login, or WANDB_API_KEY), or set WANDB_MODE=offline and "
                          f"upload later with wandb sync") from None


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
