"""The run folder on disk: named (the same on every rank), created (or one line naming why
not), locked while a process trains in it, cleared of the temporary files a killed save
left behind.

The lock is an fcntl.flock on `train.lock` in the folder: the OS releases it when the
process ends, however it ends, so a dead run never blocks its own `--resume latest`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from bigbatch import checkpoint as ckpt
from bigbatch.config import BatchLayout, Run, TrainConfig
from bigbatch.distributed import World, broadcast_object
from bigbatch.errors import ConfigError
from bigbatch.model import config_name
from bigbatch.runlog import log

LOCK = "train.lock"
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def claimed(run_dir: Path, logs: str) -> Iterator[Path]:
    """The run folder with its checkpoints/ folder, locked for this process until exit."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK, "a+")
    except OSError as error:
        raise unwritable(run_dir, logs, error) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"run folder {run_dir} is in use by another training process "
                              f"({lock.read().strip() or 'pid unknown'}): wait for it to end, "
                              f"or choose another --name") from None
        try:
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}\n")
            lock.flush()
            remove_stale_temporaries(run_dir / "checkpoints")
        except OSError as error:
            raise unwritable(run_dir, logs, error) from None
        yield run_dir


def unwritable(run_dir: Path, logs: str, error: OSError) -> ConfigError:
    return ConfigError(f"--logs {logs}: cannot write the run folder {run_dir} ({error.strerror}): "
                       f"pass --logs a writable folder with free space")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """`.epoch_*.pt.tmp` files of saves that a kill cut short (only ever under the lock:
    no live process is writing them)."""
    stale = sorted(directory.glob(".*.pt.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def disk_errors_named(logs: str) -> Iterator[None]:
    """A full or read-only disk met while writing logs: one line naming the file."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_OR_READ_ONLY:
            raise
        raise ConfigError(f"cannot write {error.filename or logs} ({error.strerror}): free "
                          f"space under --logs {logs}, then continue with --resume latest") from None


def copy_codebase(run_dir: Path) -> Path:
    """--copy-codebase: the bigbatch package this run imports, copied to RUN/code/bigbatch, so
    the run folder records the code that trained it (the run keeps executing the installed
    package; a resumed run leaves the first copy as it is)."""
    import shutil

    import bigbatch
    target = run_dir / "code" / "bigbatch"
    if not target.exists():  # copied whole or not at all: a copy cut short is redone next time
        partial = target.with_name(".bigbatch.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(Path(bigbatch.__file__).parent, partial,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        partial.rename(target)
    return target


# --- naming and claiming a run

def name_run(cfg: TrainConfig, world: World, layout: BatchLayout) -> Run:
    """logs/NAME/ (to hold out.log, metrics.jsonl, checkpoints/, curves.png, tensorboard/):
    rank 0 names the run and checks the name is free, or resumed; every rank gets the same
    name or the same error. Nothing is created yet (claim_run_dir does)."""
    name = problem = None
    if world.is_main:
        name = cfg.name
        if name is None:
            stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
            model = Path(cfg.model).stem
            name = f"{stamp}-model_{model}-lr_{cfg.lr:g}-b_{layout.batch_size}x{layout.accum_freq}"
        problem = name_taken(cfg, name)
    name, problem = broadcast_object((name, problem))
    if problem:
        raise ConfigError(problem)
    return Run(name, Path(cfg.logs) / name, layout)


def log_file(cfg: TrainConfig, run_dir: Path, world: World) -> Path | None:
    """out.log of rank 0; with --log-local also out-RANK.log of each node's first process."""
    if world.is_main:
        return run_dir / "out.log"
    if cfg.log_local and world.local_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # another node may not share the file system
        return run_dir / f"out-{world.rank}.log"
    return None


def name_taken(cfg: TrainConfig, name: str) -> str | None:
    if (Path(cfg.logs) / name).exists() and cfg.resume is None:
        return (f"run '{name}' already exists in {cfg.logs}: pass --resume latest "
                f"to continue it, or choose another --name")
    return None


def claim_run_dir(run: Run, cfg: TrainConfig, world: World, on_exit: contextlib.ExitStack) -> Callable[[], None]:
    """Rank 0 creates the run folder and locks it until the run ends (the name is checked
    again: another process may have taken it while this one built its model). Returns
    `started`, to call when a step has trained: a folder this start created is removed if
    the start fails before then (a bad flag, an out-of-memory first step: nothing trained,
    nothing saved), so that the same command can run again instead of being told to resume
    nothing."""
    problem, created = None, False
    if world.is_main:
        problem = name_taken(cfg, run.name)
        try:
            if problem is None:
                created = not run.dir.exists()
                on_exit.enter_context(claimed(run.dir, cfg.logs))
                if cfg.copy_codebase:
                    copy_codebase(run.dir)
        except ConfigError as error:
            problem = str(error)
    problem = broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    return on_exit.enter_context(_removed_unless_started(run.dir)) if created else (lambda: None)


@contextlib.contextmanager
def _removed_unless_started(run_dir: Path) -> Iterator[Callable[[], None]]:
    trained = False

    def started() -> None:
        nonlocal trained
        trained = True

    try:
        yield started
    except BaseException:
        if not trained:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def finished(cfg: TrainConfig, run: Run) -> bool:
    """--resume (latest, or a path) of a run that completed every epoch (the demo's command run twice):
    say so, and how to train anew, instead of building a model with nothing to train."""
    if cfg.resume is None:
        return False
    path = ckpt.resolve_resume(cfg.resume, run.dir / "checkpoints")
    epochs = ckpt.completed_epochs(path, config_name(cfg.model)) if path else None
    if epochs is None or epochs < cfg.epochs:
        return False
    anew = (f"delete {run.dir} or pass another --name" if cfg.resume == "latest"
            else "drop --resume")
    log.info(f"run {run.name} has finished: {path} completed {epochs} of --epochs {cfg.epochs}, "
             f"nothing left to train; to train further, raise --epochs; to train it anew, {anew}")
    return True
