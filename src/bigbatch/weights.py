"""Weights to start from (`--pretrained`): a bigbatch checkpoint, an open_clip file or tag.

Checked against `--model` before anything heavy is built, with one message naming the
fix: a checkpoint of another model, a tag whose weights are not in the local cache
(nothing is downloaded), a file that does not fit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import open_clip
import torch

from bigbatch.checkpoint import Checkpoint, canonical_weights, model_shapes, peek
from bigbatch.errors import ConfigError
from bigbatch.model import ModelBundle, create_model, hub_offline


@dataclass
class Weights:
    """What --pretrained named and how it is loaded."""

    source: str | None  # the --pretrained value
    kind: str  # "random", "checkpoint" (read here), "file" or "open_clip tag" (read by open_clip)
    state_dict: dict[str, torch.Tensor] | None = None  # for "checkpoint"
    siglip: bool = False  # the weights have a logit_bias: build the model with one
    step: int | None = None
    epoch: int | None = None


def resolve_weights(pretrained: str | None, model_name: str, *, ema: bool = False,
                    cache_dir: str | None = None) -> Weights:
    """Check --pretrained against the model before anything is built (see the module docstring)."""
    if pretrained is None:
        if ema:
            raise ConfigError("--ema evaluates a checkpoint's EMA weights: also pass --pretrained CKPT")
        return Weights(None, "random")
    path = Path(pretrained)
    if path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(f"--pretrained {pretrained} is an empty file (a save cut short?): pick another file")
        state = _peek(path)
        if isinstance(state, Checkpoint):
            return _checkpoint_weights(pretrained, state, model_name, ema)
        if ema:
            raise ConfigError(f"--ema: {pretrained} is a plain weights file with no EMA weights "
                              "(ema_state_dict): drop --ema, or pass the training checkpoint")
        siglip = isinstance(state, dict) and "logit_bias" in state
        return Weights(pretrained, "file", siglip=siglip)
    if ema:
        raise ConfigError(f"--ema needs a checkpoint file, and {pretrained} is not a file")
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag:
        if path.suffix or os.sep in pretrained or "/" in pretrained:
            raise ConfigError(f"--pretrained {pretrained}: no such file")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = f"its tags are {', '.join(tags)}" if tags else "it has none"
        raise ConfigError(f"--pretrained {pretrained}: no such file, and not an open_clip pretrained tag "
                          f"of {model_name} ({known}): pass a checkpoint file")
    if cached_tag_file(tag, cache_dir) is None:
        raise ConfigError(
            f"--pretrained {pretrained}: the weights of open_clip's {model_name} '{pretrained}' are not "
            f"available offline (not in the local cache {cache_dir or _cache_location(tag)}) and bigbatch does not "
            f"download: pass a local checkpoint file, or fetch them once where there is internet "
            f"(open_clip.create_model_and_transforms('{model_name}', pretrained='{pretrained}')) and copy the cache")
    return Weights(pretrained, "open_clip tag")


def checkpoint_model(pretrained: str) -> str:
    """The --model a bigbatch checkpoint was trained with (its config's `model`, or the open_clip
    name it records), for commands where --model may be left out."""
    path = Path(pretrained)
    if not path.is_file():
        raise ConfigError(f"--pretrained {pretrained}: no such file; pass --model too when it is an "
                          "open_clip pretrained tag")
    state = _peek(path) if path.stat().st_size else None
    if state is None:
        raise ConfigError(f"--pretrained {pretrained}: torch cannot read it (empty, damaged, or not a torch "
                          f"checkpoint): pick another file, or pass --model too for a safetensors or "
                          f"TorchScript file")
    recorded = state.model if isinstance(state, Checkpoint) else None
    if not isinstance(recorded, str):
        raise ConfigError(f"--pretrained {pretrained} records no model (bigbatch checkpoints do): pass --model")
    given = (state.config or {}).get("model")
    if isinstance(given, str) and given.endswith(".json") and Path(given).is_file():
        return given  # a config file: its name alone is unknown to open_clip
    if recorded not in open_clip.list_models():
        raise ConfigError(f"checkpoint {pretrained} is of model '{recorded}', trained from --model {given}, "
                          f"which is not here: pass --model with that model's config JSON")
    return recorded


def _peek(path: Path):
    """The file's contents (bigbatch.checkpoint.peek); its pickled code refused as --pretrained's."""
    try:
        return peek(path)
    except ConfigError as error:
        raise ConfigError(f"--pretrained {error}") from None


def _checkpoint_weights(pretrained: str, state: Checkpoint, model_name: str, ema: bool) -> Weights:
    saved = state.model
    if isinstance(saved, str) and saved != model_name:
        raise ConfigError(f"checkpoint {pretrained} is of model '{saved}', not --model '{model_name}': "
                          f"pass --model {saved} (or the config JSON it was trained from)")
    if ema and state.ema_state_dict is None:
        raise ConfigError(f"checkpoint {pretrained} holds no EMA weights (no 'ema_state_dict'; train with "
                          "--ema-decay to keep them): drop --ema")
    weights = canonical_weights(state.ema_state_dict if ema else state.state_dict)
    return Weights(pretrained, "checkpoint", weights, siglip="logit_bias" in weights,
                   step=state.step, epoch=state.epoch)


def cached_tag_file(tag: dict, cache_dir: str | None = None) -> str | None:
    """The local file open_clip would load for a pretrained tag's config, or None when it
    would have to download it. Mirrors open_clip's `download_pretrained`: the Hugging Face
    hub (safetensors first) when the tag has a hub id and huggingface_hub is installed,
    else the URL's file in ~/.cache/clip."""
    if "file" in tag:
        return tag["file"] if os.path.isfile(tag["file"]) else None
    if tag.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache  # looks, never downloads

        repo, filename = os.path.split(tag["hf_hub"])  # "org/repo/" -> ("org/repo", "")
        filename = filename or open_clip.constants.HF_WEIGHTS_NAME
        for candidate in (*_safetensors_names(filename), filename):
            found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        return None
    if tag.get("url"):
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag["url"]))
        return target if os.path.isfile(target) else None
    return None


def _safetensors_names(filename: str) -> list[str]:
    if filename == open_clip.constants.HF_WEIGHTS_NAME:
        return [open_clip.constants.HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def _cache_location(tag: dict) -> str:
    if tag.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return f"{constants.HF_HUB_CACHE}, repo {tag['hf_hub'].rstrip('/')}"
    return os.path.expanduser("~/.cache/clip")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns that the model is "initialized randomly" whenever it is given no
    weights: untrue when a checkpoint's weights (--pretrained, --resume) are loaded right
    after; the commands say it themselves when the weights are random on purpose."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_model(model: str, weights: Weights, device: torch.device | str = "cpu",
                **create_kwargs) -> ModelBundle:
    """The model of --model with --pretrained's weights on `device` (create_model's
    other options pass through; a checkpoint with a logit_bias builds a SigLIP model)."""
    pretrained = weights.source if weights.kind in ("file", "open_clip tag") else None
    try:
        with hub_offline(), _quiet_random_init():
            siglip = create_kwargs.pop("siglip", False) or weights.siglip
            bundle = create_model(model, pretrained=pretrained, siglip=siglip, device=device, **create_kwargs)
        if weights.state_dict is not None:  # 1-element scalars take the model's shape
            state = canonical_weights(weights.state_dict, model_shapes(bundle.model))
            bundle.model.load_state_dict(state, strict=True)
    except ConfigError:
        raise
    except (RuntimeError, AttributeError, KeyError, ValueError, AssertionError, OSError, EOFError,
            pickle.UnpicklingError) as error:  # what open_clip's loader raises for a file that does not fit
        if weights.kind == "random" or _device_error(error):  # the device's, not the weights'
            raise
        if weights.kind == "open_clip tag":
            raise ConfigError(f"--pretrained {weights.source}: open_clip could not load these weights from "
                              f"the local cache ({_first_line(error)}); the weights are not available offline: "
                              "pass a local checkpoint file") from None
        if weights.kind == "file":  # maybe torch could not read it either: damaged, or not weights
            raise ConfigError(f"--pretrained {weights.source} does not fit --model {model}, or is damaged "
                              f"({type(error).__name__}: {_first_line(error)}): pass the --model it was "
                              f"trained with, or another file") from None
        raise ConfigError(f"--pretrained {weights.source} does not fit --model {model} "
                          f"({type(error).__name__}: {_first_line(error)}): pass the --model it was trained with") from None
    return bundle


def _device_error(error: Exception) -> bool:
    """Out of memory, or a CUDA driver or kernel error, met while building on the device."""
    return isinstance(error, torch.OutOfMemoryError) or "CUDA" in str(error)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
