"""--remote-sync URL: the run folder copied to URL/NAME with fsspec while the run trains.

A background thread copies the files that changed since the last copy every
--remote-sync-frequency seconds; the run's end (however it ends) copies once more. Any
fsspec URL works (s3://, gs://, a local or mounted path). Hidden files (a checkpoint still
being written is `.epoch_N.pt.tmp`) and the run's lock file are not copied.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import threading
from pathlib import Path
from typing import Iterator

import fsspec

from bigbatch.errors import ConfigError
from bigbatch.rundir import LOCK

log = logging.getLogger("bigbatch")


class RemoteSync:
    def __init__(self, run_dir: Path, url: str):
        self.run_dir = run_dir
        self.fs, root = fsspec.core.url_to_fs(url)
        self.target = posixpath.join(root, run_dir.name)
        self.sent: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) last copied

    def sync(self) -> int:
        """Copy new and changed files; returns how many."""
        copied = 0
        for path in sorted(self.run_dir.rglob("*")):
            relative = path.relative_to(self.run_dir)
            if not path.is_file() or path.name == LOCK or any(p.startswith(".") for p in relative.parts):
                continue
            stat = path.stat()
            if self.sent.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            remote = posixpath.join(self.target, relative.as_posix())
            self.fs.makedirs(posixpath.dirname(remote), exist_ok=True)
            self.fs.put_file(str(path), remote)
            self.sent[path] = (stat.st_size, stat.st_mtime_ns)
            copied += 1
        return copied


@contextlib.contextmanager
def remote_sync(run_dir: Path, url: str, every_seconds: float) -> Iterator[RemoteSync]:
    """Sync now (a URL that cannot be written stops the run before training), then every
    `every_seconds` in a thread, and a last time on leaving."""
    syncer = RemoteSync(run_dir, url)
    try:
        syncer.sync()
    except Exception as error:  # fsspec backends raise their own types
        raise ConfigError(f"--remote-sync {url}: cannot copy the run folder there ({type(error).__name__}: "
                          f"{error}): pass a writable fsspec URL or path") from None
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_seconds):
            try:
                syncer.sync()
            except Exception as error:  # a network hiccup must not end the training
                log.warning(f"remote sync to {url} failed ({error}); retrying in {every_seconds:g} s")

    thread = threading.Thread(target=loop, name="bigbatch-remote-sync", daemon=True)
    thread.start()
    try:
        yield syncer
    finally:
        stop.set()
        thread.join()
        log.info(f"last sync of the run folder to {url}")  # before it, to be in the copied out.log
        syncer.sync()
