"""The checkpoint: its schema, saving and resuming a run, and plain-weights export.

A checkpoint is a dict (`Checkpoint`'s fields are its keys) whose `state_dict` holds the
bare model's weights, the key open_clip's `load_checkpoint` looks for; beside them the
optimizer, the grad scaler, the counters, the model name, the run's config, every rank's
RNG state and where in the epoch it was saved. open_clip_train's checkpoints read as one.

Files are written atomically; `epoch_latest.pt` is what `--resume latest` continues.
Weights from any writer (DDP's `module.`, torch.compile's `_orig_mod.`, FSDP2's (1,)-shaped
scalars) are made canonical in one place, `canonical_weights`.
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bigbatch import faults
from bigbatch.config import Run, TrainConfig, to_dict
from bigbatch.distributed import (World, any_over_ranks, full_state, gather_objects,
                                  load_full_model_state, load_full_optimizer_state)
from bigbatch.errors import ConfigError
from bigbatch.model import unwrap
from bigbatch.runlog import log

LATEST = "epoch_latest.pt"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP (and timm's EMA), torch.compile
SCALARS = ("logit_scale", "logit_bias")


@dataclass
class Checkpoint:
    """What a checkpoint file holds; the field names are its keys."""

    state_dict: dict  # the model's weights (open_clip's loader reads this key)
    model: str | None = None  # the open_clip config name the weights fit
    optimizer: dict | None = None  # None: a weights-only file
    scaler: dict | None = None  # fp16's GradScaler
    ema_state_dict: dict | None = None  # --ema-decay's averaged weights
    step: int | None = None  # optimizer steps done
    epoch: int | None = None  # epochs completed
    epoch_samples: int = 0  # saved mid-epoch: samples of epoch `epoch + 1` trained, all ranks
    config: dict | None = None  # the run's options
    rng: list | None = None  # each rank's generator states
    data_layout: dict | None = None  # what decided the order of the epoch's batches

    @classmethod
    def from_dict(cls, raw: dict) -> "Checkpoint":
        return cls(**{f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass
class RunState:
    """What training changes and a checkpoint restores."""

    model: torch.nn.Module  # as trained: wrapped for DDP/FSDP2, or bare
    model_name: str  # open_clip's name for it, recorded in the checkpoint
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None  # bigbatch.ema.ModelEMA
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed


# --- files

def save_checkpoint(state: Checkpoint | dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write never
    leaves a torn file. A failed write (full disk, read-only folder) removes the temporary
    file, leaves the previous checkpoint as it was and stops with one line."""
    state = state.to_dict() if isinstance(state, Checkpoint) else state
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path}: " + ("a folder, not a checkpoint file" if path.is_dir()
                                                    else "no such file") + ": check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a torn or foreign file, or pickled code: say which
        if refused_pickle(error):
            raise ConfigError(refused_pickle_message(path)) from None
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}): "
                          f"it is damaged or not a torch checkpoint; pick another file") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ConfigError(f"checkpoint {path} holds no 'state_dict': it is not a bigbatch "
                          f"or open_clip training checkpoint")
    return Checkpoint.from_dict(state)


def peek(path: str | Path) -> Any:
    """A file's contents memory-mapped where possible (an optimizer state several times the
    weights is then never read): a `Checkpoint`, another object torch reads (plain weights),
    or None when torch cannot read it (safetensors, TorchScript: open_clip's loader reads
    those). Pickled Python objects are refused in one line."""
    for mmap in (True, False):  # files of torch's legacy format cannot be memory-mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:  # torch raises many types for a file it does not read
            if refused_pickle(error):
                raise ConfigError(refused_pickle_message(path)) from None
            continue
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            return Checkpoint.from_dict(state)
        return state
    return None


def refused_pickle(error: Exception) -> bool:
    """torch.load(weights_only=True) met pickled Python code, which it does not run."""
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


def refused_pickle_message(path: str | Path) -> str:
    return (f"{path} holds pickled Python objects besides tensors, which bigbatch does not "
            f"load (they could run code): if you trust the file, re-save its weights as plain "
            f"tensors (torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'plain.pt')) "
            f"and pass that")


def completed_epochs(path: str | Path, model: str | None = None) -> int | None:
    """The epochs a checkpoint completed (its tensors stay on disk); None when it was saved
    mid-epoch, cannot be read, or records another model than `model` (resuming then says why)."""
    try:
        state = peek(path)
    except ConfigError:
        return None
    if not isinstance(state, Checkpoint) or state.epoch_samples or not isinstance(state.epoch, int):
        return None
    if model is not None and isinstance(state.model, str) and state.model != model:
        return None
    return state.epoch


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """'latest' -> the run's newest checkpoint (None when the run has none yet)."""
    if resume is None:
        return None
    if resume == "latest":
        latest = checkpoint_dir / LATEST
        return latest if latest.is_file() else None
    return Path(resume)


# --- weights

def canonical_weights(weights: Mapping[str, torch.Tensor],
                      shapes: Mapping[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Weights under open_clip's own key names (wrapper prefixes stripped), each 1-element
    tensor (logit_scale, logit_bias: () in open_clip, (1,) under FSDP2) reshaped to its
    shape in `shapes` where that is given and differs."""
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError("the checkpoint's weights are not a dict of tensors: it is not a bigbatch "
                          "or open_clip training checkpoint")
    plain = {}
    for key, value in weights.items():
        while key.startswith(WRAPPER_PREFIXES):  # DDP(compile(model)) nests both
            key = next(key.removeprefix(p) for p in WRAPPER_PREFIXES if key.startswith(p))
        shape = (shapes or {}).get(key)
        plain[key] = value.reshape(shape) if shape is not None and value.numel() == 1 else value
    return plain


def model_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The shapes a model's weights have, by canonical name (for canonical_weights)."""
    return {k: v.shape for k, v in canonical_weights(model.state_dict()).items()}


def export_weights(checkpoint: str | Path, output: str | Path, *, ema: bool = False,
                   scalar_shape: Callable[[str | None], tuple[int, ...] | None] = lambda model: None
                   ) -> Checkpoint:
    """Write the plain weights of `checkpoint` (or its EMA weights) to `output`: a
    `.safetensors` name gives a safetensors file, anything else `torch.save`. Scalars get
    the shape `scalar_shape(the model the checkpoint records)` gives (None: left as saved).
    Returns the checkpoint, its `state_dict` the weights written."""
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and checkpoint.exists() and os.path.samefile(output, checkpoint):
        raise ConfigError(f"export would overwrite its input {checkpoint}: pick another OUT path")
    if output.is_dir():
        raise ConfigError(f"OUT {output} is a folder: give a file name, e.g. {output / 'weights.pt'}")
    state = load_checkpoint(checkpoint)
    if ema and state.ema_state_dict is None:
        raise ConfigError(f"checkpoint {checkpoint} holds no EMA weights (no 'ema_state_dict'; train with "
                          "--ema-decay to keep them): drop --ema to export the trained weights")
    shape = scalar_shape(state.model if isinstance(state.model, str) else None)
    shapes = None if shape is None else dict.fromkeys(SCALARS, torch.Size(shape))
    weights = canonical_weights(state.ema_state_dict if ema else state.state_dict, shapes)
    if output.suffix == ".safetensors":
        _save_safetensors(weights, output)
    else:
        save_checkpoint(weights, output)
    state.state_dict = weights
    return state


def _save_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save  # installed with open_clip (and timm)

    # safetensors refuses tensors that share memory or are not contiguous
    data = save({k: v.detach().clone().contiguous() for k, v in weights.items()})
    _atomically(path, lambda f: f.write(data))


# --- a run's state

def save_run(state: RunState, run: Run, cfg: TrainConfig, world: World, epoch_samples: int = 0) -> None:
    """Every rank takes part (FSDP2 gathers shards); rank 0 writes. `state.epoch` epochs
    are complete, and `epoch_samples` samples (all ranks) of the next one (mid-epoch saves)."""
    directory = run.dir / "checkpoints"
    refuse_nonfinite_weights(state, directory, world)
    weights, optimizer = full_state(state.model, state.optimizer)
    rng = all_rng_states(world)
    if not world.is_main:
        return
    saved = Checkpoint(
        weights, model=state.model_name, optimizer=optimizer,
        scaler=state.scaler.state_dict() if state.scaler else None,
        ema_state_dict=state.ema.state_dict() if state.ema else None,
        step=state.step, epoch=state.epoch, epoch_samples=epoch_samples, config=to_dict(cfg),
        rng=rng, data_layout=data_layout(cfg, run))
    if epoch_samples:
        save_checkpoint(saved, directory / LATEST)
        log.info(f"checkpoint saved: {directory / LATEST} (step {state.step}, {epoch_samples} "
                 f"samples into epoch {state.epoch + 1})")
        return
    # epoch_N.pt first: a kill between the two leaves the older latest, whose resume
    # trains epoch N again and rewrites epoch_N.pt, so neither goes missing. The same state
    # twice: latest is a second name of epoch_N.pt (written once, not twice)
    if cfg.save_frequency and state.epoch % cfg.save_frequency == 0:
        link_checkpoint(save_checkpoint(saved, directory / f"epoch_{state.epoch}.pt"), directory / LATEST)
        if cfg.delete_previous_checkpoint:
            delete_older_epochs(directory, state.epoch)
    else:
        save_checkpoint(saved, directory / LATEST)
    log.info(f"checkpoint saved: {directory / LATEST} (epoch {state.epoch}, step {state.step})")


def resume_run(state: RunState, run: Run, cfg: TrainConfig, world: World) -> int:
    """Restore `state` from --resume's checkpoint, if any; returns this rank's batches of
    the epoch `state.epoch + 1` already trained on (saved mid-epoch)."""
    path = resolve_resume(cfg.resume, run.dir / "checkpoints")
    if path is None:
        if cfg.resume == "latest":
            log.info(f"--resume latest: no checkpoint in {run.dir} yet, starting a new run")
        if cfg.pretrained is None:  # instead of open_clip's warning, which also comes on resume
            log.info("starting from random weights (no --pretrained)")
        return 0
    try:
        saved = load_checkpoint(path)
    except ConfigError as error:
        other = readable_epoch_checkpoint(path) if cfg.resume == "latest" else None
        raise ConfigError(f"{error}" + (f" (this run's newest other one: --resume {other})" if other else "")) from None
    restore(state, saved, path, cfg)
    if saved.rng and len(saved.rng) == world.world_size:  # the same ranks: continue each one's stream
        restore_rng_state(saved.rng[world.rank], world)
    # the epoch's samples already seen, in this run's batches: exact with the same data
    # layout; CSV and synthetic data also when only batch-size or world-size changed
    # (one permutation per epoch, dealt out to the ranks in turn), shards only roughly
    skip = saved.epoch_samples // (run.layout.batch_size * world.world_size)
    if skip and saved.data_layout != data_layout(cfg, run):
        log.warning(f"{path} was saved mid-epoch with another data layout "
                    f"({saved.data_layout}, now {data_layout(cfg, run)}): the batches "
                    "left out of this epoch only approximate those already trained on")
    where = (f"step {state.step}, {skip} batches into epoch {state.epoch + 1}" if skip
             else f"step {state.step}, after epoch {state.epoch}")
    log.info(f"resumed from {path}: {where}")
    return skip


def restore(state: RunState, saved: Checkpoint, path: Path, cfg: TrainConfig) -> None:
    """Weights, optimizer, scaler, EMA and counters, each mismatch named in one line."""
    if saved.optimizer is None:
        raise ConfigError(f"{path} holds weights but no training state: to start from it, "
                          f"pass it as --pretrained instead of --resume")
    try:
        load_full_model_state(state.model, canonical_weights(saved.state_dict, model_shapes(state.model)))
    except (RuntimeError, KeyError, ValueError):
        raise ConfigError(f"checkpoint {path} was saved from model {saved.model!r}, "
                          f"not --model {cfg.model}: resume with the same --model") from None
    try:
        load_full_optimizer_state(state.model, state.optimizer, saved.optimizer)
    except (RuntimeError, KeyError, ValueError):
        raise ConfigError(f"checkpoint {path} has optimizer state for other trainable "
                          f"parameters: resume with the run's --lock-*, --layer-decay and "
                          f"--lr-image/--lr-text, or start a new run from it with --pretrained") from None
    if state.scaler is not None and saved.scaler:
        state.scaler.load_state_dict(saved.scaler)
    if state.ema is not None:  # an EMA new to this run starts from the resumed weights
        state.ema.load_state_dict(saved.ema_state_dict or unwrap(state.model).state_dict())
    state.step, state.epoch = saved.step or 0, saved.epoch or 0


def readable_epoch_checkpoint(damaged: Path) -> Path | None:
    """The newest epoch_N.pt beside `damaged` that opens (its index, memory-mapped: cheap),
    other than a second name of `damaged` itself."""
    for _, path in sorted(epoch_checkpoints(damaged.parent), reverse=True):
        if path.exists() and damaged.exists() and path.samefile(damaged):
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except Exception:  # damaged too
            continue
    return None


def delete_older_epochs(directory: Path, epoch: int) -> None:
    """--delete-previous-checkpoint: epoch_K.pt for every K < epoch (epoch_latest.pt stays)."""
    for number, path in epoch_checkpoints(directory):
        if number < epoch:
            path.unlink(missing_ok=True)


def epoch_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(N, path) of each epoch_N.pt in `directory` (not epoch_latest.pt)."""
    numbered = [(path.stem.removeprefix("epoch_"), path) for path in directory.glob("epoch_*.pt")]
    return [(int(number), path) for number, path in numbered if number.isdigit()]


def refuse_nonfinite_weights(state: RunState, directory: Path, world: World) -> None:
    """Every rank checks its own weights (FSDP2: its shards) and all stop together."""
    named = dict(unwrap(state.model).state_dict())
    if state.ema:
        named.update({f"ema {k}": v for k, v in state.ema.state_dict().items()})
    bad = faults.nonfinite_tensors(named)
    if any_over_ranks(bool(bad), device=world.device)[0]:
        raise ConfigError(f"not writing a checkpoint to {directory} at step {state.step}: the "
                          f"weights hold NaN or inf ({', '.join(bad[:3]) or 'on another rank'}); "
                          f"the previous checkpoint is kept; {faults.LIKELY_CAUSES}")


def data_layout(cfg: TrainConfig, run: Run) -> dict:
    """What decides which batches an epoch's first steps took."""
    return {"train_data": cfg.train_data, "train_num_samples": cfg.train_num_samples,
            "batch_size": run.layout.batch_size, "world_size": run.layout.world_size,
            "workers": cfg.workers, "seed": cfg.seed}


def all_rng_states(world: World) -> list[dict]:
    """Each rank's CPU and CUDA generators, so a resumed run draws the same dropout masks."""
    mine = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(world.device)
    return gather_objects(mine)


def restore_rng_state(state: dict, world: World) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and world.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), world.device)
