"""The training loop: data -> cached_backward -> clip -> step, with logs, eval and checkpoints.

It reads top to bottom: what a run is built from is in build.py, its folder in rundir.py,
the step's pieces in step.py, its checkpoint in checkpoint.py.

One optimizer step takes `accum_freq` micro-batches; `cached_backward` turns them into
the exact gradient of the loss over all of them (the effective batch is
batch-size x accum-freq x world-size). Micro-batches left at the end of an epoch
still make a (smaller) step. The learning-rate schedule counts optimizer steps.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from bigbatch import checkpoint as ckpt
from bigbatch import faults, rundir
from bigbatch.accumulation import cached_backward
from bigbatch.build import (announce, batch_layout, build_losses, build_model, build_optimizer,
                            build_teacher, check_user_data, data_spec, open_data, seed_everything,
                            start_distributed)
from bigbatch.config import BatchLayout, Run, TrainConfig, evaluation_only, to_dict, wants_report
from bigbatch.data import DataError
from bigbatch.device import autocast_factory, resolve_precision, set_threads
from bigbatch.distributed import World, any_over_ranks, cleanup, gather_objects
from bigbatch.errors import ConfigError
from bigbatch.ema import ModelEMA
from bigbatch.evaluate import evaluate, format_metrics
from bigbatch.imagenet import imagenet_zeroshot, open_trees
from bigbatch.losses import create_loss
from bigbatch.model import set_frozen_towers_to_eval, unwrap
from bigbatch.preemption import Preempted, SignalWatch
from bigbatch.remote_sync import remote_sync
from bigbatch.rundir import claim_run_dir, finished, log_file, name_run
from bigbatch.runlog import (RunLog, close_log_file, log, note_in_log_file, setup_console_logging,
                             start_wandb)
from bigbatch.step import (learning_rate, logged_scalars, optimizer_step, set_learning_rate,
                           step_inputs, step_micro_batches, unscale_and_clip)
from bigbatch.zeroshot import load_classnames, load_templates


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
    layout = batch_layout(cfg, world, precision)
    on_exit.enter_context(faults.out_of_memory_named(*faults.memory_advice(cfg, layout)))
    if evaluation_only(cfg):
        return evaluate_once(cfg, world, layout, precision)
    run = name_run(cfg, world, layout)
    if finished(cfg, run):
        return {}
    for split in (True, False) if cfg.val_data else (True,):
        check_user_data(data_spec(cfg, world, layout, train=split))
    seed_everything(cfg.seed)  # the same initial weights on every rank
    bundle, model, frozen_inputs = build_model(cfg, world, layout)
    teacher = build_teacher(cfg, world, bundle.model)
    seed_everything(cfg.seed + world.rank)  # but each rank its own dropout masks
    loss_name = "siglip" if cfg.siglip else "clip"
    loss_fn, caption_loss = build_losses(cfg, world, loss_name, bundle.model)
    not_recomputed = frozen_inputs  # frozen towers pass 2 skips: none for CoCa, whose decoder reads both
    if frozen_inputs and caption_loss is not None:
        log.info("CoCa's caption decoder reads both towers: the locked tower is recomputed in pass 2")
        not_recomputed = ()
    train_data = open_data(data_spec(cfg, world, layout, train=True), bundle.preprocess_train,
                           bundle.tokenizer)
    autocast = autocast_factory(precision, device)
    evaluation = Evaluation(cfg, world, layout, bundle, create_loss(loss_name), autocast)
    started = claim_run_dir(run, cfg, world, on_exit)
    setup_console_logging(log_file(cfg, run.dir, world), enabled=world.is_main or
                          (cfg.log_local and world.local_rank == 0), debug=cfg.debug)
    if cfg.remote_sync and world.is_main:
        on_exit.enter_context(remote_sync(run.dir, cfg.remote_sync, cfg.remote_sync_frequency))

    steps_per_epoch = math.ceil(train_data.num_batches / layout.accum_freq)
    total_steps = steps_per_epoch * cfg.epochs
    state = ckpt.RunState(model, bundle.name, build_optimizer(cfg, unwrap(model)),
                          scaler=torch.amp.GradScaler(device.type) if precision == "amp" else None,
                          ema=ModelEMA(unwrap(model), cfg.ema_decay) if cfg.ema_decay else None)
    skip_batches = ckpt.resume_run(state, run, cfg, world)
    if skip_batches >= train_data.num_batches:  # saved mid-epoch, now a shorter epoch: it is over
        state.epoch, skip_batches = state.epoch + 1, 0
    runlog = RunLog(run.dir if world.is_main else None, total_steps=total_steps, device=device,
                    tensorboard=wants_report(cfg, "tensorboard"),
                    wandb_run=start_wandb(run.dir, project=cfg.wandb_project_name, name=run.name,
                                          notes=cfg.wandb_notes, config=to_dict(cfg))
                    if world.is_main and wants_report(cfg, "wandb") else None)
    on_exit.callback(runlog.close)  # however the run ends (a stop, a fault), the writers flush
    announce(cfg, run, world, bundle.model, precision, train_data.num_samples, steps_per_epoch)
    skipped_steps = faults.NonFiniteSteps(cfg.max_nonfinite_steps)

    metrics: dict = {}
    start_epoch = state.epoch
    signals.deferred()  # a signal from here on ends the step it arrives in, with a checkpoint
    for epoch in range(start_epoch, cfg.epochs):
        batches_done = skip_batches if epoch == start_epoch else 0  # a resumed epoch's already trained
        train_data.set_epoch(epoch, batches_done)
        if epoch == cfg.epochs - 1 and world.is_main:  # the plot's imports, beside the last epoch
            threading.Thread(target=importlib.import_module, args=("bigbatch.plots",), daemon=True).start()
        model.train()
        set_frozen_towers_to_eval(unwrap(model), frozen_inputs)
        for micro_batches in step_micro_batches(train_data.loader, layout.accum_freq):
            lr = set_learning_rate(state.optimizer, learning_rate(state.step, cfg, total_steps))
            # the loader is read as pass 1 goes: each micro-batch is embedded as it arrives
            inputs, to_device = step_inputs(micro_batches, device, layout.offload_inputs)
            loss = cached_backward(model, inputs, loss_fn, autocast=autocast, grad_scaler=state.scaler,
                                   frozen_inputs=not_recomputed, to_device=to_device,
                                   sample_loss=caption_loss, teacher=teacher)
            grad_norm = unscale_and_clip(model, state.optimizer, state.scaler, cfg.grad_clip_norm)
            # the step's one host sync: a flag from its loss and norm, and the signals;
            # fp16: the scaler skips overflowing gradients itself; ranks agree on both flags
            skip, stop = any_over_ranks(faults.nonfinite(loss, None if state.scaler else grad_norm),
                                        signals.requested, device=device)
            optimizer_step(model, state.optimizer, state.scaler, apply=not skip)
            if state.ema and not skip:
                state.ema.update(unwrap(model))
            state.step += 1
            started()  # a start that failed before its first step trained left no run folder
            skipped_steps.record(skip, state.step)
            runlog.count_skipped(micro_batches.skipped)
            print_now = state.step % cfg.log_every_n_steps == 0 or state.step == total_steps or skip
            runlog.train_step(  # the loss is read (a host sync) only when the line is printed
                step=state.step, epoch=epoch + 1, loss=loss, lr=lr,
                data_seconds=micro_batches.data_seconds,
                samples=micro_batches.samples * world.world_size,  # its effective batch: a last step may be short
                print_now=print_now,
                extra=logged_scalars(model, grad_norm, skipped_steps.total, loss_fn) if print_now else None)
            skipped_steps.stop_if_stuck(state.step)
            batches_done += micro_batches.count
            if stop or (cfg.save_every_n_steps and state.step % cfg.save_every_n_steps == 0
                        and batches_done < train_data.num_batches):  # the epoch's end saves anyway
                with runlog.paused():
                    ckpt.save_run(state, run, cfg, world,
                                  epoch_samples=batches_done * layout.batch_size * world.world_size)
            if stop:
                raise preempted(signals.signum, run, state.step, world)
        runlog.report_skipped()

        state.epoch = epoch + 1
        with runlog.paused():  # the next progress line's samples/s is the steps' alone
            if due(state.epoch, cfg.save_frequency, cfg.epochs) or cfg.save_every_n_steps:
                ckpt.save_run(state, run, cfg, world)  # first: an evaluation that fails loses no training
            metrics = evaluation.after_epoch(state, runlog) or metrics

    curves = draw_curves(run.dir, world)
    if curves:
        log.info(f"curves saved to {curves.result()}")
    return metrics


def due(completed_epochs: int, frequency: int, total_epochs: int) -> bool:
    """Every `frequency` epochs, and always after the last one (frequency 0: never)."""
    return frequency > 0 and (completed_epochs % frequency == 0 or completed_epochs == total_epochs)


# --- after an epoch

def draw_curves(run_dir: Path, world: World) -> Future | None:
    """curves.png from metrics.jsonl, drawn in a thread (rank 0) whose result the caller
    waits for; matplotlib is imported only there (and beside the last epoch, see _train)."""
    if not world.is_main or not (run_dir / "metrics.jsonl").is_file():
        return None

    def draw() -> Path:
        from bigbatch.plots import plot_training_curves
        return plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")

    pool = ThreadPoolExecutor(1, thread_name_prefix="curves")
    drawing = pool.submit(draw)
    pool.shutdown(wait=False)  # the thread ends with the drawing; the caller waits on its result
    return drawing



class Evaluation:
    """What follows an epoch when it is due: validation on --val-data (loss, retrieval,
    zero-shot with the given class names) and zero-shot ImageNet; of the EMA weights
    when they are kept."""

    def __init__(self, cfg: TrainConfig, world: World, layout: BatchLayout, bundle, loss_fn, autocast):
        self.cfg, self.world, self.loss_fn, self.autocast = cfg, world, loss_fn, autocast
        self.batch_size, self.tokenizer = layout.batch_size, bundle.tokenizer
        self.val_data = (open_data(data_spec(cfg, world, layout, train=False), bundle.preprocess_val,
                                   bundle.tokenizer) if cfg.val_data else None)
        self.imagenet = open_trees({"imagenet_val": cfg.imagenet_val, "imagenet_v2": cfg.imagenet_v2},
                                   bundle.preprocess_val)

    def after_epoch(self, state: ckpt.RunState, runlog: RunLog) -> dict:
        """The metrics of `state.epoch`'s end (empty when nothing was due), logged."""
        cfg, completed = self.cfg, state.epoch
        model = state.ema.module if state.ema else state.model
        zeroshot = due(completed, cfg.zeroshot_frequency, cfg.epochs)
        metrics = {}
        if self.val_data and due(completed, cfg.val_frequency, cfg.epochs):
            metrics = self.validation(model, zeroshot)
            runlog.validation(step=state.step, epoch=completed, metrics=metrics)
        if self.imagenet and zeroshot:
            imagenet = self.imagenet_zeroshot(model)
            runlog.validation(step=state.step, epoch=completed, metrics=imagenet)
            metrics = {**metrics, **imagenet}
        return metrics

    def validation(self, model, zeroshot: bool) -> dict:
        cfg = self.cfg
        classnames = templates = None
        if zeroshot and cfg.zeroshot_classnames:
            classnames = load_classnames(cfg.zeroshot_classnames, "--zeroshot-classnames")
            templates = load_templates(cfg.zeroshot_templates, "--zeroshot-templates")
        with unsharded(model):
            metrics = evaluate(unwrap(model), self.val_data.loader, loss_fn=self.loss_fn,
                               tokenizer=self.tokenizer, classnames=classnames, templates=templates,
                               device=self.world.device, autocast=self.autocast,
                               across_ranks=torch.distributed.is_initialized())
        if classnames and "zeroshot_top1" not in metrics:
            log.warning("zero-shot skipped: --val-data has no labels (webdataset 'cls' or --csv-label-key)")
        log.info("validation: " + format_metrics(metrics))
        return metrics

    def imagenet_zeroshot(self, model) -> dict:
        """--imagenet-val / --imagenet-v2, under open_clip_train's metric names."""
        world = self.world
        with unsharded(model):
            metrics = imagenet_zeroshot(unwrap(model), self.imagenet, self.tokenizer, device=world.device,
                                        autocast=self.autocast, batch_size=self.batch_size,
                                        workers=self.cfg.workers, rank=world.rank,
                                        world_size=world.world_size)
        log.info("zero-shot ImageNet: " + ", ".join(f"{k} {v:.2%}" for k, v in metrics.items()))
        return metrics


def evaluate_once(cfg: TrainConfig, world: World, layout: BatchLayout, precision: str) -> dict:
    """No --train-data, as open_clip_train takes it: the model (--pretrained's weights)
    evaluated once on --val-data and --imagenet-val/-v2; no run folder is written."""
    if cfg.val_data:
        check_user_data(data_spec(cfg, world, layout, train=False))
    bundle, model, _ = build_model(cfg, world, layout)
    if cfg.pretrained is None:
        log.info("evaluating random weights (no --pretrained)")
    evaluation = Evaluation(cfg, world, layout, bundle, create_loss("siglip" if cfg.siglip else "clip"),
                            autocast_factory(precision, world.device))
    metrics = evaluation.validation(model, zeroshot=True) if evaluation.val_data else {}
    return {**metrics, **(evaluation.imagenet_zeroshot(model) if evaluation.imagenet else {})}


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


def preempted(signum: int | None, run: Run, step: int, world: World) -> Preempted:
    """The exception that ends a run stopped by a signal, its checkpoint saved. The ranks
    wait for rank 0 to have written it (a launcher ends them all once one exits non-zero)
    and take the signal that some rank received."""
    signum = next(s for s in gather_objects(signum) if s)
    summary = (f"stopped by {signal.Signals(signum).name} after step {step}, saved "
               f"{run.dir / 'checkpoints' / ckpt.LATEST}")
    return Preempted(signum, summary if world.is_main else None, run.name)
