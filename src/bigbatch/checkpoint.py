"""Checkpoints: written atomically, found again by `--resume latest`, loadable by open_clip.

A checkpoint is a dict whose `state_dict` holds the bare model's weights (the key
open_clip's `load_checkpoint` looks for), beside the optimizer, the grad scaler,
the step and epoch counters, the model name and the run's config.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from bigbatch.config import ConfigError

LATEST = "epoch_latest.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write never
    leaves a torn file. A failed write (full disk, read-only folder) removes the temporary
    file, leaves the previous checkpoint as it was and stops with one line."""
    return _atomically(Path(path), lambda f: torch.save(state, f))


def link_checkpoint(source: str | Path, path: str | Path) -> Path:
    """`path` becomes another name of the checkpoint `source` (a hard link, renamed into
    place), instead of a second write of the same state; a copy where the file system has
    no hard links. A later save to `path` replaces the name, never `source`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        def copy(f):
            with open(source, "rb") as original:
                shutil.copyfileobj(original, f)
        return _atomically(path, copy)
    os.replace(tmp, path)  # atomic on POSIX
    return path


def _atomically(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the checkpoint
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):  # torch: RuntimeError for I/O
            raise
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:200]
        raise ConfigError(f"could not write checkpoint {path} ({reason}): free space in (or make "
                          f"writable) {path.parent}; the previous {path.name}, if any, is "
                          f"untouched") from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: check --resume / --pretrained")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if refused_pickle(error):
            raise ConfigError(refused_pickle_message(path)) from None
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}): "
                          f"it is damaged or not a torch checkpoint; pick another file") from None
    except Exception as error:  # a torn or foreign file: say which
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}): "
                          f"it is damaged or not a torch checkpoint; pick another file") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"checkpoint {path} holds no 'state_dict': it is not a bigbatch "
                          f"or open_clip training checkpoint")
    return state


def refused_pickle(error: Exception) -> bool:
    """torch.load(weights_only=True) met pickled Python code, which it does not run."""
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


def refused_pickle_message(path: str | Path) -> str:
    return (f"{path} holds pickled Python objects besides tensors, which bigbatch does not "
            f"load (they could run code): if you trust the file, re-save its weights as plain "
            f"tensors (torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'plain.pt')) "
            f"and pass that")


def completed_epochs(path: str | Path) -> int | None:
    """The epochs a checkpoint completed, read memory-mapped (its tensors stay on disk);
    None when it was saved mid-epoch or cannot be read (resuming then says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a file it does not read
        return None
    if not isinstance(state, dict) or state.get("epoch_samples") or not isinstance(state.get("epoch"), int):
        return None
    return state["epoch"]


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """'latest' -> the run's newest checkpoint (None when the run has none yet)."""
    if resume is None:
        return None
    if resume == "latest":
        latest = checkpoint_dir / LATEST
        return latest if latest.is_file() else None
    return Path(resume)
