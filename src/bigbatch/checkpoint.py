"""Checkpoints: written atomically, found again by `--resume latest`, loadable by open_clip.

A checkpoint is a dict whose `state_dict` holds the bare model's weights (the key
open_clip's `load_checkpoint` looks for), beside the optimizer, the grad scaler,
the step and epoch counters, the model name and the run's config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bigbatch.config import ConfigError

LATEST = "epoch_latest.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file, then rename: a crash mid-write never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: check --resume / --pretrained")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a torn or foreign file: say which
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}): "
                          f"it is damaged or not a torch checkpoint; pick another file") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"checkpoint {path} holds no 'state_dict': it is not a bigbatch "
                          f"or open_clip training checkpoint")
    return state


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """'latest' -> the run's newest checkpoint (None when the run has none yet)."""
    if resume is None:
        return None
    if resume == "latest":
        latest = checkpoint_dir / LATEST
        return latest if latest.is_file() else None
    return Path(resume)
