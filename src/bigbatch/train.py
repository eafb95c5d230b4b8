"""The training loop: data -> cached_backward -> clip -> step, with logs, eval and checkpoints.

One optimizer step takes `accum_freq` micro-batches; `cached_backward` turns them into
the exact gradient of the loss over all of them (the effective batch is
batch-size x accum-freq x world-size). Micro-batches left at the end of an epoch
still make a (smaller) step. The learning-rate schedule counts optimizer steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from bigbatch import checkpoint as ckpt
from bigbatch.accumulation import cached_backward
from bigbatch.config import ConfigError, TrainConfig, to_dict
from bigbatch.data import DataSpec, make_data
from bigbatch.evaluate import evaluate, format_metrics, load_lines
from bigbatch.losses import create_loss
from bigbatch.model import create_model, parameter_groups, unwrap
from bigbatch.plots import plot_training_curves
from bigbatch.runlog import RunLog, log, setup_console_logging

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: temperature no lower than 0.01


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the last validation metrics (empty without --val-data)."""
    device = resolve_device(cfg.device)
    precision = cfg.resolved_precision(device.type)
    run_dir = prepare_run_dir(cfg)
    setup_console_logging(run_dir / "out.log")
    seed_everything(cfg.seed)

    bundle = create_model(cfg.model, pretrained=cfg.pretrained, siglip=cfg.siglip,
                          force_patch_dropout=cfg.force_patch_dropout,
                          grad_checkpointing=cfg.grad_checkpointing, device=device)
    model = bundle.model
    loss_fn = create_loss("siglip" if cfg.siglip else "clip")
    train_data = open_data(data_spec(cfg, train=True), bundle.preprocess_train, bundle.tokenizer)
    val_data = (open_data(data_spec(cfg, train=False), bundle.preprocess_val, bundle.tokenizer)
                if cfg.val_data else None)

    steps_per_epoch = math.ceil(train_data.num_batches / cfg.accum_freq)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.wd), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scaler = torch.amp.GradScaler(device.type) if precision == "amp" else None
    autocast = autocast_factory(precision, device)
    start_epoch, step = resume(cfg, run_dir, model, optimizer, scaler, device)

    runlog = RunLog(run_dir, total_steps=total_steps, device=device,
                    tensorboard=cfg.report_to == "tensorboard")
    effective_batch = cfg.effective_batch(world_size=1)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run {cfg.name} in {run_dir}")
    log.info(f"model {cfg.model}: {n_params / 1e6:.1f} M parameters on {device}, {precision}")
    log.info(f"effective batch {effective_batch} = batch-size {cfg.batch_size} x accum-freq "
             f"{cfg.accum_freq} x world-size 1; {train_data.num_samples} samples/epoch, "
             f"{steps_per_epoch} steps/epoch, {total_steps} steps")

    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_data.set_epoch(epoch)
        model.train()
        for micro_batches, data_seconds in group_micro_batches(train_data.loader, cfg.accum_freq):
            lr = set_learning_rate(optimizer, learning_rate(step, cfg, total_steps))
            inputs = [(b.images.to(device, non_blocking=True), b.texts.to(device, non_blocking=True))
                      for b in micro_batches]
            loss = cached_backward(model, inputs, loss_fn, autocast=autocast, grad_scaler=scaler)
            grad_norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip_norm)
            step += 1
            for b in micro_batches:
                runlog.count_skipped(b.skipped)
            runlog.train_step(
                step=step, epoch=epoch + 1, loss=loss.item(), lr=lr, data_seconds=data_seconds,
                samples=sum(len(b.images) for b in micro_batches), effective_batch=effective_batch,
                print_now=step % cfg.log_every_n_steps == 0 or step == total_steps,
                extra={"logit_scale": unwrap(model).logit_scale.exp().item(),
                       **({"grad_norm": grad_norm} if grad_norm is not None else {})})
        runlog.report_skipped()

        completed = epoch + 1
        if val_data and due(completed, cfg.val_frequency, cfg.epochs):
            metrics = run_validation(cfg, model, val_data, bundle.tokenizer, loss_fn, device,
                                     autocast, zeroshot=due(completed, cfg.zeroshot_frequency, cfg.epochs))
            runlog.validation(step=step, epoch=completed, metrics=metrics)
        if cfg.save_frequency and due(completed, cfg.save_frequency, cfg.epochs):
            save(run_dir, cfg, bundle.name, model, optimizer, scaler, step, completed)

    runlog.close()
    if (run_dir / "metrics.jsonl").is_file():
        plot = plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        log.info(f"curves saved to {plot}")
    return metrics


# --- setup

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return device


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """logs/NAME/ holding out.log, metrics.jsonl, checkpoints/, curves.png, tensorboard/."""
    if cfg.name is None:
        stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
        model = Path(cfg.model).stem
        cfg.name = f"{stamp}-model_{model}-lr_{cfg.lr:g}-b_{cfg.batch_size}x{cfg.accum_freq}"
    run_dir = Path(cfg.logs) / cfg.name
    if run_dir.exists() and cfg.resume is None:
        raise ConfigError(f"run '{cfg.name}' already exists in {cfg.logs}: pass --resume latest "
                          f"to continue it, or choose another --name")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_spec(cfg: TrainConfig, *, train: bool) -> DataSpec:
    return DataSpec(
        paths=cfg.train_data if train else cfg.val_data,
        dataset_type=cfg.dataset_type, batch_size=cfg.batch_size,
        num_samples=cfg.train_num_samples if train else cfg.val_num_samples,
        resampled=cfg.dataset_resampled and train, workers=cfg.workers, seed=cfg.seed,
        is_train=train, csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key,
        csv_separator=cfg.csv_separator, csv_label_key=cfg.csv_label_key)


def open_data(spec: DataSpec, preprocess, tokenizer):
    """The data layer reports a user's mistake (no such shard, missing column) as ValueError."""
    try:
        return make_data(spec, preprocess, tokenizer)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def autocast_factory(precision: str, device: torch.device):
    dtypes = {"amp": torch.float16, "amp_bf16": torch.bfloat16}
    if precision not in dtypes:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtypes[precision])


# --- the step

def group_micro_batches(loader: Iterable, accum_freq: int) -> Iterator[tuple[list, float]]:
    """Lists of `accum_freq` micro-batches (fewer at the epoch's end) and the seconds spent
    waiting for them."""
    group, waited = [], 0.0
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - start
        if batch is None:
            break
        group.append(batch)
        if len(group) == accum_freq:
            yield group, waited
            group, waited = [], 0.0
    if group:
        yield group, waited


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup over `warmup` optimizer steps, then cosine to zero (or constant)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_scheduler == "const":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * cfg.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(model, optimizer, scaler, clip_norm: float | None) -> float | None:
    """Unscale (fp16), clip the accumulated gradient, step, zero, clamp the logit scale."""
    grad_norm = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm).item()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return grad_norm


def due(completed_epochs: int, frequency: int, total_epochs: int) -> bool:
    """Every `frequency` epochs, and always after the last one (frequency 0: never)."""
    return frequency > 0 and (completed_epochs % frequency == 0 or completed_epochs == total_epochs)


# --- evaluation and checkpoints

def run_validation(cfg, model, val_data, tokenizer, loss_fn, device, autocast, zeroshot: bool) -> dict:
    classnames = templates = None
    if zeroshot and cfg.zeroshot_classnames:
        classnames, templates = load_lines(cfg.zeroshot_classnames), load_lines(cfg.zeroshot_templates)
    metrics = evaluate(unwrap(model), val_data.loader, loss_fn=loss_fn, tokenizer=tokenizer,
                       classnames=classnames, templates=templates, device=device, autocast=autocast)
    if classnames and "zeroshot_top1" not in metrics:
        log.warning("zero-shot skipped: --val-data has no labels (webdataset 'cls' or --csv-label-key)")
    log.info("validation: " + format_metrics(metrics))
    return metrics


def save(run_dir, cfg, model_name, model, optimizer, scaler, step, epoch) -> None:
    state = {
        "state_dict": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None, "step": step, "epoch": epoch,
        "model": model_name, "config": to_dict(cfg), "rng": torch.get_rng_state(),
    }
    directory = run_dir / "checkpoints"
    ckpt.save_checkpoint(state, directory / ckpt.LATEST)
    if epoch % cfg.save_frequency == 0:
        ckpt.save_checkpoint(state, directory / f"epoch_{epoch}.pt")
    log.info(f"checkpoint saved: {directory / ckpt.LATEST} (epoch {epoch}, step {step})")


def resume(cfg, run_dir, model, optimizer, scaler, device) -> tuple[int, int]:
    """Restore a checkpoint if asked; returns (first epoch to run, optimizer steps done)."""
    path = ckpt.resolve_resume(cfg.resume, run_dir / "checkpoints")
    if path is None:
        if cfg.resume == "latest":
            log.info(f"--resume latest: no checkpoint in {run_dir} yet, starting fresh")
        return 0, 0
    state = ckpt.load_checkpoint(path, map_location=device)
    try:
        unwrap(model).load_state_dict(ckpt.strip_wrapper_prefix(state["state_dict"]))
    except RuntimeError:
        raise ConfigError(f"checkpoint {path} was saved from model {state.get('model')!r}, "
                          f"not --model {cfg.model}: resume with the same --model") from None
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        torch.set_rng_state(state["rng"].cpu())
    log.info(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}")
    return state["epoch"], state["step"]
