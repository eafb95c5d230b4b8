"""The run folder on disk: created (or one line naming why not), locked while a process
trains in it, cleared of the temporary files a killed save left behind.

The lock is an fcntl.flock on `train.lock` in the folder: the OS releases it when the
process ends, however it ends, so a dead run never blocks its own `--resume latest`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from bigbatch.config import ConfigError

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
    if not target.exists():
        shutil.copytree(Path(bigbatch.__file__).parent, target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target
