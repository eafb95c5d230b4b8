"""The training loop: data -> cached_backward -> clip -> step, with logs, eval and checkpoints.

One optimizer step takes `accum_freq` micro-batches; `cached_backward` turns them into
the exact gradient of the loss over all of them (the effective batch is
batch-size x accum-freq x world-size). Micro-batches left at the end of an epoch
still make a (smaller) step. The learning-rate schedule counts optimizer steps.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from bigbatch import checkpoint as ckpt
from bigbatch import faults, plan, rundir
from bigbatch.accumulation import cached_backward
from bigbatch.compiled import compile_model
from bigbatch.config import ConfigError, TrainConfig, to_dict, wants_report
from bigbatch.data import DataError, DataSpec, check_data, make_data
from bigbatch.device import autocast_factory, resolve_precision, set_threads
from bigbatch.distributed import (World, any_over_ranks, as_local, broadcast_object, cleanup,
                                  full_state, gather_objects, init_distributed,
                                  load_full_model_state, load_full_optimizer_state, wrap_model)
from bigbatch.evaluate import evaluate, format_metrics
from bigbatch.imagenet import imagenet_zeroshot, open_trees
from bigbatch.ema import ModelEMA
from bigbatch.inputs import DeviceCopier
from bigbatch.losses import CaptionLoss, Weighted, create_loss
from bigbatch.model import (is_coca, lock_towers, open_clip_options, parameter_groups,
                            register_model_config, set_frozen_towers_to_eval, unwrap, use_bnb_linear)
from bigbatch.preemption import Preempted, SignalWatch
from bigbatch.zeroshot import load_classnames, load_templates
from bigbatch.remote_sync import remote_sync
from bigbatch.runlog import (RunLog, close_log_file, log, note_in_log_file, setup_console_logging,
                             start_wandb)
from bigbatch.weights import load_model, resolve_weights

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: temperature no lower than 0.01


def train(cfg: TrainConfig) -> dict:
    """Train as configured on this rank; returns the last validation metrics."""
    set_threads(cfg.threads)
    world = start_distributed(cfg)
    try:
        with contextlib.ExitStack() as on_exit, rundir.disk_errors_named(cfg.logs):
            return _train(cfg, world, on_exit)
    except (ConfigError, DataError) as error:  # how the run ended, in out.log too
        note_in_log_file(f"bigbatch: error: {error}")
        raise
    except Preempted as stop:
        note_in_log_file(f"bigbatch: {stop.summary}")
        raise
    finally:
        close_log_file()
        cleanup()


def _train(cfg: TrainConfig, world: World, on_exit: contextlib.ExitStack) -> dict:
    """`on_exit` holds what the run releases when it ends: its folder's lock, the signal
    handlers (installed first, so that loader workers inherit them).

    What needs no model is checked first (the run's name, the data's paths and columns); the
    run folder is created once the model and data are ready: a start that fails leaves none."""
    signals = on_exit.enter_context(SignalWatch())
    setup_console_logging(enabled=world.is_main, debug=cfg.debug)  # out.log joins once the run folder exists
    device = world.device
    precision = resolve_precision(cfg.precision, device)
    choose_batch_layout(cfg, world, precision)
    run_dir = name_run(cfg, world)
    if finished(cfg, run_dir):
        return {}
    for split in (True, False) if cfg.val_data else (True,):
        check_user_data(data_spec(cfg, world, train=split))
    seed_everything(cfg.seed)  # the same initial weights on every rank
    bundle, model, frozen_inputs = build_model(cfg, world)
    seed_everything(cfg.seed + world.rank)  # but each rank its own dropout masks
    loss_name = "siglip" if cfg.siglip else "clip"
    loss_fn, caption_loss = build_losses(cfg, world, loss_name, bundle.model)
    not_recomputed = frozen_inputs  # frozen towers pass 2 skips: none for CoCa, whose decoder reads both
    if frozen_inputs and caption_loss is not None:
        log.info("CoCa's caption decoder reads both towers: the locked tower is recomputed in pass 2")
        not_recomputed = ()
    train_data = open_data(data_spec(cfg, world, train=True), bundle.preprocess_train, bundle.tokenizer)
    val_data = (open_data(data_spec(cfg, world, train=False), bundle.preprocess_val, bundle.tokenizer)
                if cfg.val_data else None)
    imagenet = open_trees({"imagenet_val": cfg.imagenet_val, "imagenet_v2": cfg.imagenet_v2},
                          bundle.preprocess_val)
    claim_run_dir(run_dir, cfg, world, on_exit)
    setup_console_logging(log_file(cfg, run_dir, world), enabled=world.is_main or
                          (cfg.log_local and world.local_rank == 0), debug=cfg.debug)
    if cfg.remote_sync and world.is_main:
        on_exit.enter_context(remote_sync(run_dir, cfg.remote_sync, cfg.remote_sync_frequency))

    steps_per_epoch = math.ceil(train_data.num_batches / cfg.accum_freq)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(cfg, unwrap(model))
    ema = ModelEMA(unwrap(model), cfg.ema_decay) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler(device.type) if precision == "amp" else None
    autocast = autocast_factory(precision, device)
    start_epoch, step, skip_batches = resume(cfg, run_dir, model, optimizer, scaler, ema, world)
    if skip_batches >= train_data.num_batches:  # saved mid-epoch, now a shorter epoch: it is over
        start_epoch, skip_batches = start_epoch + 1, 0
    runlog = RunLog(run_dir if world.is_main else None, total_steps=total_steps, device=device,
                    tensorboard=wants_report(cfg, "tensorboard"),
                    wandb_run=start_wandb(run_dir, project=cfg.wandb_project_name, name=cfg.name,
                                          notes=cfg.wandb_notes, config=to_dict(cfg))
                    if world.is_main and wants_report(cfg, "wandb") else None)
    on_exit.callback(runlog.close)  # however the run ends (a stop, a fault), the writers flush
    announce(cfg, world, bundle.model, precision, run_dir, train_data.num_samples, steps_per_epoch)
    skipped_steps = faults.NonFiniteSteps(cfg.max_nonfinite_steps)

    metrics: dict = {}
    curves = None
    for epoch in range(start_epoch, cfg.epochs):
        batches_done = skip_batches if epoch == start_epoch else 0  # a resumed epoch's already trained
        train_data.set_epoch(epoch, batches_done)
        model.train()
        set_frozen_towers_to_eval(unwrap(model), frozen_inputs)
        for micro_batches in step_micro_batches(train_data.loader, cfg.accum_freq):
            lr = set_learning_rate(optimizer, learning_rate(step, cfg, total_steps))
            # the loader is read as pass 1 goes: each micro-batch is embedded as it arrives
            inputs, to_device = step_inputs(micro_batches, device, cfg.offload_inputs)
            loss = cached_backward(model, inputs, loss_fn, autocast=autocast, grad_scaler=scaler,
                                   frozen_inputs=not_recomputed, to_device=to_device,
                                   sample_loss=caption_loss)
            grad_norm = unscale_and_clip(model, optimizer, scaler, cfg.grad_clip_norm)
            # the step's one host sync: a flag from its loss and norm, and the signals;
            # fp16: the scaler skips overflowing gradients itself; ranks agree on both flags
            skip, stop = any_over_ranks(faults.nonfinite(loss, None if scaler else grad_norm),
                                        signals.requested, device=device)
            optimizer_step(model, optimizer, scaler, apply=not skip)
            if ema and not skip:
                ema.update(unwrap(model))
            step += 1
            skipped_steps.record(skip, step)
            runlog.count_skipped(micro_batches.skipped)
            print_now = step % cfg.log_every_n_steps == 0 or step == total_steps or skip
            runlog.train_step(  # the loss is read (a host sync) only when the line is printed
                step=step, epoch=epoch + 1, loss=loss, lr=lr, data_seconds=micro_batches.data_seconds,
                samples=micro_batches.samples * world.world_size,
                effective_batch=cfg.effective_batch(world.world_size), print_now=print_now,
                extra=logged_scalars(model, grad_norm, skipped_steps.total) if print_now else None)
            skipped_steps.stop_if_stuck(step)
            batches_done += micro_batches.count
            if stop or (cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0
                        and batches_done < train_data.num_batches):  # the epoch's end saves anyway
                save(run_dir, cfg, bundle.name, model, optimizer, scaler, ema, step, epoch, world,
                     epoch_samples=batches_done * cfg.batch_size * world.world_size)
            if stop:
                raise preempted(signals.signum, cfg, run_dir, step, world)
        runlog.report_skipped()

        completed = epoch + 1
        if val_data and due(completed, cfg.val_frequency, cfg.epochs):
            zeroshot = due(completed, cfg.zeroshot_frequency, cfg.epochs)
            metrics = run_validation(cfg, ema.module if ema else model, val_data, bundle.tokenizer,
                                     create_loss(loss_name), device, autocast, zeroshot)
            runlog.validation(step=step, epoch=completed, metrics=metrics)
        if imagenet and due(completed, cfg.zeroshot_frequency, cfg.epochs):
            zeroshot = run_imagenet(cfg, ema.module if ema else model, imagenet, bundle.tokenizer,
                                    world, autocast)
            metrics.update(zeroshot)
            runlog.validation(step=step, epoch=completed, metrics=zeroshot)
        if completed == cfg.epochs:  # the log is complete: draw it while the checkpoint is written
            curves = draw_curves(run_dir, world)
        if due(completed, cfg.save_frequency, cfg.epochs) or cfg.save_every_n_steps:
            save(run_dir, cfg, bundle.name, model, optimizer, scaler, ema, step, completed, world)

    curves = curves or draw_curves(run_dir, world)  # a run resumed after its last epoch
    if curves:
        log.info(f"curves saved to {curves.result()}")
    return metrics


# --- setup

def start_distributed(cfg: TrainConfig) -> World:
    """Join torchrun's/SLURM's process group (none for one process) on this rank's device."""
    backend = None if cfg.dist_backend == "auto" else cfg.dist_backend
    try:
        world = init_distributed(cfg.device, backend, init_method=cfg.dist_url,
                                 set_device_rank=not cfg.no_set_device_rank)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.fsdp and world.world_size == 1:
        cleanup()
        raise ConfigError("--fsdp shards the model across ranks: launch with torchrun "
                          "--nproc-per-node N (N > 1), or drop --fsdp for one process")
    return world


def build_model(cfg: TrainConfig, world: World):
    """The open_clip model with its towers locked as asked, wrapped for this world; and the
    model-input positions of fully frozen towers (run once per sample)."""
    weights = resolve_weights(cfg.pretrained, register_model_config(cfg.model), cache_dir=cfg.cache_dir)
    bundle = load_model(cfg.model, weights, world.device, siglip=cfg.siglip,
                        force_patch_dropout=cfg.force_patch_dropout,
                        grad_checkpointing=cfg.grad_checkpointing, **open_clip_options(cfg))
    if cfg.use_bnb_linear:
        use_bnb_linear(bundle.model, cfg.use_bnb_linear)
        bundle.model.to(world.device)
    frozen_inputs = lock_towers(
        bundle.model, image=cfg.lock_image, image_unlocked_groups=cfg.lock_image_unlocked_groups,
        image_freeze_bn_stats=cfg.lock_image_freeze_bn_stats, text=cfg.lock_text,
        text_unlocked_layers=cfg.lock_text_unlocked_layers,
        text_freeze_layer_norm=cfg.lock_text_freeze_layer_norm)
    trainable = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    if all(n.startswith("logit_") for n in trainable):  # CoCa's decoder would still train
        raise ConfigError("--lock-image and --lock-text together leave only the logit scale to "
                          "train: unlock some layers (--lock-image-unlocked-groups / "
                          "--lock-text-unlocked-layers) or lock one tower")
    if cfg.use_bn_sync and world.world_size > 1:  # BatchNorm statistics over all ranks
        bundle.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bundle.model)
    if cfg.torchcompile:
        compile_model(bundle.model)
    # DDP's static graph does not survive a cached step's two passes (its reducer asserts)
    static_graph = cfg.ddp_static_graph and cfg.accum_freq == 1
    if cfg.ddp_static_graph and not static_graph:
        log.warning("--ddp-static-graph ignored: DDP's static graph does not hold for the two "
                    "passes of feature-cached accumulation (--accum-freq > 1)")
    model = wrap_model(bundle.model, world, fsdp=cfg.fsdp, static_graph=static_graph)
    return bundle, model, frozen_inputs


def build_losses(cfg: TrainConfig, world: World, loss_name: str, model: torch.nn.Module):
    """The contrastive loss over the global batch; for CoCa also its caption loss, whose
    terms do not couple samples (cached_backward takes it per micro-batch in pass 2)."""
    contrastive = create_loss(loss_name, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                              rank=world.rank, world_size=world.world_size, tile_size=cfg.loss_tile_size)
    if not is_coca(model):
        return contrastive, None
    if cfg.coca_contrastive_loss_weight != 1.0:
        contrastive = Weighted(contrastive, cfg.coca_contrastive_loss_weight)
    return contrastive, CaptionLoss(cfg.coca_caption_loss_weight, pad_id=getattr(model, "pad_id", 0))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """--opt adamw, sgd or timm/NAME; each group's lr_scale carries --layer-decay and
    --lr-image/--lr-text."""
    tower_lr_scale = tuple((lr if lr is not None else cfg.lr) / cfg.lr
                           for lr in (cfg.lr_image, cfg.lr_text))
    groups = parameter_groups(model, cfg.wd, layer_decay=cfg.layer_decay,
                              tower_lr_scale=tower_lr_scale)
    if cfg.opt == "adamw":
        return adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum or 0.0)
    from timm.optim import create_optimizer_v2
    extra = {} if cfg.momentum is None else {"momentum": cfg.momentum}
    try:
        return create_optimizer_v2(groups, cfg.opt.removeprefix("timm/"), lr=cfg.lr,
                                   weight_decay=cfg.wd, **extra)
    except (AssertionError, ValueError, TypeError) as error:
        raise ConfigError(f"--opt {cfg.opt}: timm cannot build it ({error}); see "
                          f"timm.optim.list_optimizers()") from None


def adamw(groups: list[dict], **hyperparameters) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the parameters' device has one (CPU, CUDA).

    The fused step reads each parameter, gradient and moment once; the default per-tensor
    loop makes many passes. On the 2-core CPU the step of bigbatch-small takes 12 ms
    instead of 68 ms, on GPUs it beats foreach; the update is the same AdamW.
    """
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                 for p in params)
    return torch.optim.AdamW(groups, fused=fused, **hyperparameters)


def announce(cfg, world, model, precision, run_dir, samples_per_epoch, steps_per_epoch) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    wrapper = "FSDP2" if cfg.fsdp else "DDP" if world.world_size > 1 else "one process"
    log.info(f"run {cfg.name} in {run_dir}")
    log.info(f"model {cfg.model}: {n_params / 1e6:.1f} M parameters on {world.device}, "
             f"{precision}, {wrapper}")
    log.info(f"effective batch {cfg.effective_batch(world.world_size)} = batch-size "
             f"{cfg.batch_size} x accum-freq {cfg.accum_freq} x world-size {world.world_size}; "
             f"{samples_per_epoch} samples/epoch, {steps_per_epoch} steps/epoch, "
             f"{steps_per_epoch * cfg.epochs} steps")


def choose_batch_layout(cfg: TrainConfig, world: World, precision: str) -> None:
    """--batch-size auto: the largest micro-batch the GPU holds (bigbatch plan's estimate);
    --global-batch-size G: accum-freq = G / (batch-size x world-size)."""
    if cfg.batch_size == "auto":
        if world.device.type != "cuda":
            raise ConfigError("--batch-size auto sizes the micro-batch to the GPU's memory: "
                              "on CPU give a number")
        cfg.batch_size = plan.find_max_batch_size(
            register_model_config(cfg.model), world_size=world.world_size,
            gpu_memory_bytes=torch.cuda.get_device_properties(world.device).total_memory,
            global_batch_size=cfg.global_batch_size,
            accum_freq=None if cfg.global_batch_size else cfg.accum_freq, precision=precision,
            grad_checkpointing=cfg.grad_checkpointing, local_loss=cfg.local_loss,
            tile=cfg.loss_tile_size, device=str(world.device), siglip=cfg.siglip,
            offload_inputs=cfg.offload_inputs, force_patch_dropout=cfg.force_patch_dropout)
        cfg.batch_size = smallest_over_ranks(cfg.batch_size, world)  # ranks must agree
        log.info(f"--batch-size auto: {cfg.batch_size} per GPU")
    if cfg.global_batch_size is not None:
        cfg.accum_freq = plan.derive_accum_freq(cfg.global_batch_size, cfg.batch_size,
                                                world.world_size)
    if world.device.type == "cuda" and cfg.accum_freq > 1 and not cfg.offload_inputs:
        cfg.offload_inputs = offload_if_needed(cfg, world, precision)


def offload_if_needed(cfg: TrainConfig, world: World, precision: str) -> bool:
    """--offload-inputs, chosen when bigbatch plan says the step's K micro-batches of uint8
    images do not fit on the GPU beside the rest but one at a time would; and said so."""
    memory = torch.cuda.get_device_properties(world.device).total_memory
    crowded = plan.inputs_must_wait_on_host(
        register_model_config(cfg.model), gpu_memory=memory, batch_size=cfg.batch_size,
        accum_freq=cfg.accum_freq, world_size=world.world_size, precision=precision,
        grad_checkpointing=cfg.grad_checkpointing, local_loss=cfg.local_loss,
        tile=cfg.loss_tile_size, siglip=cfg.siglip, force_patch_dropout=cfg.force_patch_dropout)
    if crowded is not None:
        log.info(f"--offload-inputs chosen: the step's inputs ({crowded.inputs / 2**30:.1f} GiB) do not "
                 f"fit on the GPU beside the rest (planned peak {crowded.peak / 2**30:.1f} of "
                 f"{crowded.usable_memory / 2**30:.1f} GiB usable); they wait in pinned host memory")
    return crowded is not None


def smallest_over_ranks(value: int, world: World) -> int:
    return min(gather_objects(value))


def name_run(cfg: TrainConfig, world: World) -> Path:
    """logs/NAME/ (to hold out.log, metrics.jsonl, checkpoints/, curves.png, tensorboard/):
    rank 0 names the run and checks the name is free, or resumed; every rank gets the same
    name or the same error. Nothing is created yet (claim_run_dir does)."""
    problem = None
    if world.is_main:
        if cfg.name is None:
            stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
            model = Path(cfg.model).stem
            cfg.name = f"{stamp}-model_{model}-lr_{cfg.lr:g}-b_{cfg.batch_size}x{cfg.accum_freq}"
        problem = name_taken(cfg)
    cfg.name, problem = broadcast_object((cfg.name, problem))
    if problem:
        raise ConfigError(problem)
    return Path(cfg.logs) / cfg.name


def log_file(cfg: TrainConfig, run_dir: Path, world: World) -> Path | None:
    """out.log of rank 0; with --log-local also out-RANK.log of each node's first process."""
    if world.is_main:
        return run_dir / "out.log"
    if cfg.log_local and world.local_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # another node may not share the file system
        return run_dir / f"out-{world.rank}.log"
    return None


def name_taken(cfg: TrainConfig) -> str | None:
    if (Path(cfg.logs) / cfg.name).exists() and cfg.resume is None:
        return (f"run '{cfg.name}' already exists in {cfg.logs}: pass --resume latest "
                f"to continue it, or choose another --name")
    return None


def claim_run_dir(run_dir: Path, cfg: TrainConfig, world: World, on_exit: contextlib.ExitStack) -> None:
    """Rank 0 creates the run folder and locks it until the run ends (the name is checked
    again: another process may have taken it while this one built its model)."""
    problem = None
    if world.is_main:
        problem = name_taken(cfg)
        try:
            if problem is None:
                on_exit.enter_context(rundir.claimed(run_dir, cfg.logs))
                if cfg.copy_codebase:
                    rundir.copy_codebase(run_dir)
        except ConfigError as error:
            problem = str(error)
    problem = broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def finished(cfg: TrainConfig, run_dir: Path) -> bool:
    """--resume latest of a run that completed every epoch (the demo's command run twice):
    say so, and how to train anew, instead of building a model with nothing to train."""
    path = ckpt.resolve_resume(cfg.resume, run_dir / "checkpoints") if cfg.resume == "latest" else None
    epochs = ckpt.completed_epochs(path) if path else None
    if epochs is None or epochs < cfg.epochs:
        return False
    log.info(f"run {cfg.name} has finished: {path} completed {epochs} of --epochs {cfg.epochs}, "
             f"nothing left to train; to train it anew, delete {run_dir} or pass another --name")
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_spec(cfg: TrainConfig, world: World, *, train: bool) -> DataSpec:
    """Training and validation data are split across ranks (validation without padding:
    no sample is counted twice; evaluate gathers the ranks' features)."""
    return DataSpec(
        paths=cfg.train_data if train else cfg.val_data,
        dataset_type=cfg.dataset_type, batch_size=cfg.batch_size,
        num_samples=cfg.train_num_samples if train else cfg.val_num_samples,
        resampled=cfg.dataset_resampled and train, workers=cfg.workers, seed=cfg.seed,
        upsampling_factors=cfg.train_data_upsampling_factors if train else None,
        is_train=train, csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key,
        csv_separator=cfg.csv_separator, csv_label_key=cfg.csv_label_key,
        rank=world.rank, world_size=world.world_size)


def check_user_data(spec: DataSpec) -> None:
    """make_data's checks that need no model: paths, columns (before one is built)."""
    try:
        check_data(spec)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def open_data(spec: DataSpec, preprocess, tokenizer):
    """The data layer reports a user's mistake (no such shard, missing column) as ValueError."""
    try:
        return make_data(spec, preprocess, tokenizer)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


# --- the step

class StepBatches:
    """One optimizer step's micro-batches, `accum_freq` of them (fewer at the epoch's end),
    taken from the loader only when the step asks for the next one: loading overlaps pass 1.
    Iterate it once, to its end. It counts what it gave, for the log; it holds no batch."""

    def __init__(self, batches: Iterator, first, accum_freq: int, waited: float):
        self.batches, self.first, self.accum_freq = batches, first, accum_freq
        self.data_seconds = waited  # spent waiting for the loader
        self.count, self.samples, self.skipped = 0, 0, Counter()

    def __iter__(self) -> Iterator:
        batch, self.first = self.first, None
        while batch is not None:
            self.count += 1
            self.samples += len(batch.images)
            self.skipped.update(batch.skipped)
            yield batch
            if self.count == self.accum_freq:
                return
            batch = self._next()

    def _next(self):
        start = time.perf_counter()
        batch = next(self.batches, None)
        self.data_seconds += time.perf_counter() - start
        return batch


def step_micro_batches(loader: Iterable, accum_freq: int) -> Iterator[StepBatches]:
    """The epoch's steps; each one's first micro-batch is taken before the step starts (there
    is a step only if there is a batch)."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        first = next(batches, None)
        if first is None:
            return
        yield StepBatches(batches, first, accum_freq, time.perf_counter() - start)


def step_inputs(micro_batches: Iterable, device: torch.device, offload: bool):
    """The step's (images, texts) micro-batches as they arrive (uint8 images, pinned for a
    GPU) and the move cached_backward applies before each forward. Each goes to the device
    on arrival; or, with --offload-inputs, stays on the host and is copied one ahead of the
    forward that needs it: pass 1 in order, then pass 2's recomputes (all but the last)."""
    copier = DeviceCopier(device)

    def arriving() -> Iterator[tuple]:
        host = []
        for b in micro_batches:
            inputs = (b.images, b.texts)
            if not offload:
                yield copier(inputs)  # later moves of device tensors are no-ops
                continue
            copier.expect(inputs)
            host.append(inputs)
            yield inputs
        copier.expect(*host[:-1])  # pass 2's order, known once the engine looks past the last

    return arriving(), copier


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup over `warmup` optimizer steps, then cosine to zero, constant, or
    constant until the last --epochs-cooldown epochs decay it polynomially to
    --lr-cooldown-end. --skip-scheduler: --lr throughout."""
    if cfg.skip_scheduler:
        return cfg.lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_scheduler == "const":
        return cfg.lr
    if cfg.lr_scheduler == "const-cooldown":
        cooldown = total_steps // cfg.epochs * cfg.epochs_cooldown  # steps per epoch x epochs
        start = total_steps - cooldown
        if step < start:
            return cfg.lr
        decay = (1 - (step - start) / cooldown) ** cfg.lr_cooldown_power
        return decay * (cfg.lr - cfg.lr_cooldown_end) + cfg.lr_cooldown_end
    progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * cfg.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """The schedule's lr, times each group's scale (layer decay, tower lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def unscale_and_clip(model, optimizer, scaler, clip_norm: float | None) -> torch.Tensor:
    """Unscale (fp16) the accumulated gradient and clip it; its global norm before clipping
    (a tensor on the device: no host sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm is not None:
        return as_local(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return as_local(torch.nn.utils.get_total_norm(grads))


def optimizer_step(model, optimizer, scaler, apply: bool = True) -> None:
    """Step (unless a non-finite step is dropped), zero the gradient, clamp the logit scale."""
    if scaler is not None:
        if apply:
            scaler.step(optimizer)
        scaler.update()
    elif apply:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def logged_scalars(model, grad_norm: torch.Tensor, nonfinite_steps: int) -> dict[str, float]:
    """What a progress line adds to the loss: read at log steps only (host syncs; FSDP2's
    full logit scale is a collective, and every rank logs at the same steps)."""
    return {"logit_scale": as_local(unwrap(model).logit_scale).exp().item(),
            "grad_norm": grad_norm.item(), "nonfinite_steps": nonfinite_steps}


def due(completed_epochs: int, frequency: int, total_epochs: int) -> bool:
    """Every `frequency` epochs, and always after the last one (frequency 0: never)."""
    return frequency > 0 and (completed_epochs % frequency == 0 or completed_epochs == total_epochs)


# --- evaluation and checkpoints

def draw_curves(run_dir: Path, world: World) -> Future | None:
    """curves.png from metrics.jsonl, drawn in a thread (rank 0): it overlaps the last
    checkpoint's write instead of following it, and matplotlib is imported only there."""
    if not world.is_main or not (run_dir / "metrics.jsonl").is_file():
        return None

    def draw() -> Path:
        from bigbatch.plots import plot_training_curves
        return plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")

    pool = ThreadPoolExecutor(1, thread_name_prefix="curves")
    drawing = pool.submit(draw)
    pool.shutdown(wait=False)  # the thread ends with the drawing; the caller waits on its result
    return drawing



def run_validation(cfg, model, val_data, tokenizer, loss_fn, device, autocast, zeroshot: bool) -> dict:
    classnames = templates = None
    if zeroshot and cfg.zeroshot_classnames:
        classnames = load_classnames(cfg.zeroshot_classnames, "--zeroshot-classnames")
        templates = load_templates(cfg.zeroshot_templates, "--zeroshot-templates")
    with unsharded(model):
        metrics = evaluate(unwrap(model), val_data.loader, loss_fn=loss_fn, tokenizer=tokenizer,
                           classnames=classnames, templates=templates, device=device,
                           autocast=autocast, across_ranks=torch.distributed.is_initialized())
    if classnames and "zeroshot_top1" not in metrics:
        log.warning("zero-shot skipped: --val-data has no labels (webdataset 'cls' or --csv-label-key)")
    log.info("validation: " + format_metrics(metrics))
    return metrics


def run_imagenet(cfg, model, trees, tokenizer, world: World, autocast) -> dict:
    """--imagenet-val / --imagenet-v2, under open_clip_train's metric names."""
    with unsharded(model):
        metrics = imagenet_zeroshot(unwrap(model), trees, tokenizer, device=world.device,
                                    autocast=autocast, batch_size=cfg.batch_size,
                                    workers=cfg.workers, rank=world.rank, world_size=world.world_size)
    log.info("zero-shot ImageNet: " + ", ".join(f"{k} {v:.2%}" for k, v in metrics.items()))
    return metrics


@contextlib.contextmanager
def unsharded(model):
    """FSDP2 gathers the root's parameters only inside forward(); evaluation calls
    encode_image/encode_text directly, so gather them for its duration."""
    if not hasattr(model, "unshard"):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def save(run_dir, cfg, model_name, model, optimizer, scaler, ema, step, epoch, world: World,
         epoch_samples: int = 0) -> None:
    """Every rank takes part (FSDP2 gathers shards); rank 0 writes. `epoch` epochs are
    complete, and `epoch_samples` samples (all ranks) of the next one (mid-epoch saves)."""
    directory = run_dir / "checkpoints"
    refuse_nonfinite_weights(model, ema, directory, step, world)
    model_state, optimizer_state = full_state(model, optimizer)
    rng_states = all_rng_states(world)
    if not world.is_main:
        return
    state = {
        "state_dict": model_state, "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler else None, "step": step, "epoch": epoch,
        "model": model_name, "config": to_dict(cfg), "rng": rng_states,
        "epoch_samples": epoch_samples, "data_layout": data_layout(cfg, world),
    }
    if ema:
        state["ema_state_dict"] = ema.state_dict()
    if epoch_samples:
        ckpt.save_checkpoint(state, directory / ckpt.LATEST)
        log.info(f"checkpoint saved: {directory / ckpt.LATEST} (step {step}, {epoch_samples} "
                 f"samples into epoch {epoch + 1})")
        return
    # epoch_N.pt first: a kill between the two leaves the older latest, whose resume
    # trains epoch N again and rewrites epoch_N.pt, so neither goes missing. The same state
    # twice: latest is a second name of epoch_N.pt (written once, not twice)
    if cfg.save_frequency and epoch % cfg.save_frequency == 0:
        saved = ckpt.save_checkpoint(state, directory / f"epoch_{epoch}.pt")
        ckpt.link_checkpoint(saved, directory / ckpt.LATEST)
        if cfg.delete_previous_checkpoint:
            delete_older_epochs(directory, epoch)
    else:
        ckpt.save_checkpoint(state, directory / ckpt.LATEST)
    log.info(f"checkpoint saved: {directory / ckpt.LATEST} (epoch {epoch}, step {step})")


def delete_older_epochs(directory: Path, epoch: int) -> None:
    """--delete-previous-checkpoint: epoch_K.pt for every K < epoch (epoch_latest.pt stays)."""
    for path in directory.glob("epoch_*.pt"):
        number = path.stem.removeprefix("epoch_")
        if number.isdigit() and int(number) < epoch:
            path.unlink(missing_ok=True)


def refuse_nonfinite_weights(model, ema, directory: Path, step: int, world: World) -> None:
    """Every rank checks its own weights (FSDP2: its shards) and all stop together."""
    named = dict(unwrap(model).state_dict())
    if ema:
        named.update({f"ema {k}": v for k, v in ema.state_dict().items()})
    bad = faults.nonfinite_tensors(named)
    if any_over_ranks(bool(bad), device=world.device)[0]:
        raise ConfigError(f"not writing a checkpoint to {directory} at step {step}: the weights "
                          f"hold NaN or inf ({', '.join(bad[:3]) or 'on another rank'}); the "
                          f"previous checkpoint is kept; {faults.LIKELY_CAUSES}")


def preempted(signum: int | None, cfg: TrainConfig, run_dir: Path, step: int,
              world: World) -> Preempted:
    """The exception that ends a run stopped by a signal, its checkpoint saved. The ranks
    wait for rank 0 to have written it (a launcher ends them all once one exits non-zero)
    and take the signal that some rank received."""
    signum = next(s for s in gather_objects(signum) if s)
    summary = (f"stopped by {signal.Signals(signum).name} after step {step}, saved "
               f"{run_dir / 'checkpoints' / ckpt.LATEST}")
    return Preempted(signum, summary if world.is_main else None, cfg.name)


def data_layout(cfg: TrainConfig, world: World) -> dict:
    """What decides which batches an epoch's first steps took."""
    return {"train_data": cfg.train_data, "train_num_samples": cfg.train_num_samples,
            "batch_size": cfg.batch_size, "world_size": world.world_size, "workers": cfg.workers,
            "seed": cfg.seed}


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


def resume(cfg, run_dir, model, optimizer, scaler, ema, world: World) -> tuple[int, int, int]:
    """Restore a checkpoint if asked; returns (first epoch to run, optimizer steps done,
    this rank's batches of that epoch already trained on)."""
    path = ckpt.resolve_resume(cfg.resume, run_dir / "checkpoints")
    if path is None:
        if cfg.resume == "latest":
            log.info(f"--resume latest: no checkpoint in {run_dir} yet, starting a new run")
        if cfg.pretrained is None:  # instead of open_clip's warning, which also comes on resume
            log.info("starting from random weights (no --pretrained)")
        return 0, 0, 0
    state = ckpt.load_checkpoint(path)
    if "optimizer" not in state:
        raise ConfigError(f"{path} holds weights but no training state: to start from it, "
                          f"pass it as --pretrained instead of --resume")
    try:
        load_full_model_state(model, state["state_dict"])
    except (RuntimeError, KeyError, ValueError):
        raise ConfigError(f"checkpoint {path} was saved from model {state.get('model')!r}, "
                          f"not --model {cfg.model}: resume with the same --model") from None
    try:
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    except (RuntimeError, KeyError, ValueError):
        raise ConfigError(f"checkpoint {path} has optimizer state for other trainable "
                          f"parameters: resume with the run's --lock-*, --layer-decay and "
                          f"--lr-image/--lr-text, or start a new run from it with --pretrained") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:  # an EMA new to this run starts from the resumed weights
        ema.load_state_dict(state.get("ema_state_dict") or unwrap(model).state_dict())
    rng = state.get("rng") or []
    if len(rng) == world.world_size:  # the same layout of ranks: continue each one's stream
        restore_rng_state(rng[world.rank], world)
    # the epoch's samples already seen, in this run's batches: exact with the same data
    # layout; CSV and synthetic data also when only batch-size or world-size changed
    # (one permutation per epoch, dealt out to the ranks in turn), shards only roughly
    skip = state.get("epoch_samples", 0) // (cfg.batch_size * world.world_size)
    if skip and state.get("data_layout") != data_layout(cfg, world):
        log.warning(f"{path} was saved mid-epoch with another data layout "
                    f"({state.get('data_layout')}, now {data_layout(cfg, world)}): the batches "
                    "left out of this epoch only approximate those already trained on")
    where = f", {skip} batches into epoch {state['epoch'] + 1}" if skip else ""
    log.info(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}{where}")
    return state["epoch"], state["step"], skip
