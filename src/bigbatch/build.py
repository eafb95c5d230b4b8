"""What a run is built from, before its first step: the process group, the batch layout
(--batch-size auto, --global-batch-size, --offload-inputs resolved), the model with its
locked towers, a distillation teacher, its losses and optimizer, and the data.

Each builder turns the user's mistakes into one ConfigError naming the fix; the checks that
need no model (`check_user_data`) run before anything heavy is built.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from bigbatch import plan
from bigbatch.compiled import compile_model
from bigbatch.config import BatchLayout, Run, TrainConfig, adamw_hyperparameters
from bigbatch.data import DataSpec, check_data, make_data
from bigbatch.distributed import World, cleanup, gather_objects, init_distributed, wrap_model
from bigbatch.errors import COCA_STUDENT_WITH_TEACHER, ConfigError
from bigbatch.losses import CaptionLoss, Weighted, create_loss
from bigbatch.model import (is_coca, lock_towers, open_clip_options, parameter_groups,
                            register_model_config, unwrap, use_bnb_linear)
from bigbatch.runlog import log
from bigbatch.teacher import Teacher, load_teacher
from bigbatch.weights import load_model, resolve_weights


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


def build_model(cfg: TrainConfig, world: World, layout: BatchLayout):
    """The open_clip model with its towers locked as asked, wrapped for this world; and the
    model-input positions of fully frozen towers (run once per sample)."""
    weights = resolve_weights(cfg.pretrained, register_model_config(cfg.model), cache_dir=cfg.cache_dir)
    bundle = load_model(cfg.model, weights, world.device, siglip=cfg.siglip,
                        force_patch_dropout=cfg.force_patch_dropout,
                        grad_checkpointing=cfg.grad_checkpointing, **open_clip_options(cfg))
    if cfg.use_bnb_linear:
        use_bnb_linear(bundle.model, cfg.use_bnb_linear)
        bundle.model.to(world.device)
    for tower, options in (("image", ("unlocked_groups", "freeze_bn_stats")),
                           ("text", ("unlocked_layers", "freeze_layer_norm"))):
        ignored = [f"--lock-{tower}-{o.replace('_', '-')}" for o in options if getattr(cfg, f"lock_{tower}_{o}")]
        if ignored and not getattr(cfg, f"lock_{tower}"):  # as open_clip_train, which says nothing
            log.warning(f"{', '.join(ignored)} without --lock-{tower}: ignored (the {tower} tower trains whole)")
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
    static_graph = cfg.ddp_static_graph and layout.accum_freq == 1
    if cfg.ddp_static_graph and not static_graph:
        log.warning("--ddp-static-graph ignored: DDP's static graph does not hold for the two "
                    "passes of feature-cached accumulation (--accum-freq > 1)")
    model = wrap_model(bundle.model, world, fsdp=cfg.fsdp, static_graph=static_graph)
    return bundle, model, frozen_inputs


def build_teacher(cfg: TrainConfig, world: World, student: torch.nn.Module) -> Teacher | None:
    """--distill-model's frozen teacher on this rank's device (not wrapped: it never trains)."""
    if cfg.distill_model is None:
        return None
    if is_coca(student):
        raise ConfigError(COCA_STUDENT_WITH_TEACHER)
    teacher = load_teacher(cfg.distill_model, cfg.distill_pretrained, student, world.device,
                           precision=open_clip_options(cfg)["precision"], cache_dir=cfg.cache_dir)
    log.info(f"distilling from {cfg.distill_model} ({cfg.distill_pretrained}), frozen: embedded once "
             f"per sample, its term taken with the contrastive loss over the global batch")
    return teacher


def build_losses(cfg: TrainConfig, world: World, loss_name: str, model: torch.nn.Module):
    """The contrastive loss over the global batch (with the distillation term when there is
    a teacher); for CoCa also its caption loss, whose terms do not couple samples
    (cached_backward takes it per micro-batch in pass 2)."""
    if cfg.distill_model is not None:  # build_teacher refused a CoCa student
        loss_name = "distill"
    contrastive = create_loss(loss_name, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                              rank=world.rank, world_size=world.world_size, tile_size=cfg.loss_tile_size)
    caption = caption_loss(model, cfg.coca_caption_loss_weight)
    if caption is not None and cfg.coca_contrastive_loss_weight != 1.0:
        contrastive = Weighted(contrastive, cfg.coca_contrastive_loss_weight)
    return contrastive, caption


def caption_loss(model: torch.nn.Module, weight: float = 2.0) -> CaptionLoss | None:
    """CoCa's caption loss, with the model's padding id (through a DDP wrapper); None for a
    model without captions."""
    bare = unwrap(model)
    return CaptionLoss(weight, pad_id=getattr(bare, "pad_id", 0)) if is_coca(bare) else None


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """--opt adamw, sgd or timm/NAME; each group's lr_scale carries --layer-decay and
    --lr-image/--lr-text."""
    tower_lr_scale = tuple((lr if lr is not None else cfg.lr) / cfg.lr
                           for lr in (cfg.lr_image, cfg.lr_text))
    groups = parameter_groups(model, cfg.wd, layer_decay=cfg.layer_decay,
                              tower_lr_scale=tower_lr_scale)
    if cfg.opt == "adamw":
        beta1, beta2, eps = adamw_hyperparameters(cfg)
        return adamw(groups, lr=cfg.lr, betas=(beta1, beta2), eps=eps)
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


def batch_layout(cfg: TrainConfig, world: World, precision: str) -> BatchLayout:
    """--batch-size auto: the largest micro-batch the GPU holds (bigbatch plan's estimate);
    --global-batch-size G: accum-freq = G / (batch-size x world-size); --offload-inputs
    where the step's inputs would not fit on the GPU."""
    batch_size, accum_freq = cfg.batch_size, cfg.accum_freq
    if batch_size == "auto":
        if world.device.type != "cuda":
            raise ConfigError("--batch-size auto sizes the micro-batch to the GPU's memory: "
                              "on CPU give a number")
        options = plan.PlanOptions.from_config(
            cfg, world_size=world.world_size, precision=precision, device=str(world.device),
            gpu_memory=torch.cuda.get_device_properties(world.device).total_memory)
        batch_size = plan.find_max_batch_size(options, global_batch_size=cfg.global_batch_size,
                                              accum_freq=None if cfg.global_batch_size else cfg.accum_freq)
        batch_size = smallest_over_ranks(batch_size, world)  # ranks must agree
        log.info(f"--batch-size auto: {batch_size} per GPU")
    if cfg.global_batch_size is not None:
        accum_freq = plan.derive_accum_freq(cfg.global_batch_size, batch_size, world.world_size)
    layout = BatchLayout(batch_size, accum_freq, world.world_size, cfg.offload_inputs)
    if world.device.type == "cuda" and accum_freq > 1 and not cfg.offload_inputs:
        layout = dataclasses.replace(layout, offload_inputs=offload_if_needed(cfg, layout, world, precision))
    return layout


def offload_if_needed(cfg: TrainConfig, layout: BatchLayout, world: World, precision: str) -> bool:
    """--offload-inputs, chosen when bigbatch plan says the step's K micro-batches of uint8
    images do not fit on the GPU beside the rest but one at a time would; and said so."""
    memory = torch.cuda.get_device_properties(world.device).total_memory
    options = plan.PlanOptions.from_config(cfg, world_size=world.world_size, precision=precision,
                                           gpu_memory=memory)
    crowded = plan.inputs_must_wait_on_host(options, batch_size=layout.batch_size,
                                            accum_freq=layout.accum_freq)
    if crowded is not None:
        log.info(f"--offload-inputs chosen: the step's inputs ({crowded.inputs / 2**30:.1f} GiB) do not "
                 f"fit on the GPU beside the rest (planned peak {crowded.peak / 2**30:.1f} of "
                 f"{crowded.usable_memory / 2**30:.1f} GiB usable); they wait in pinned host memory")
    return crowded is not None


def smallest_over_ranks(value: int, world: World) -> int:
    return min(gather_objects(value))


def announce(cfg, run: Run, world, model, precision, samples_per_epoch, steps_per_epoch) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    wrapper = "FSDP2" if cfg.fsdp else "DDP" if world.world_size > 1 else "one process"
    layout = run.layout
    log.info(f"run {run.name} in {run.dir}")
    log.info(f"model {cfg.model}: {n_params / 1e6:.1f} M parameters on {world.device}, "
             f"{precision}, {wrapper}")
    log.info(f"effective batch {layout.effective_batch} = batch-size {layout.batch_size} x "
             f"accum-freq {layout.accum_freq} x world-size {layout.world_size}; "
             f"{samples_per_epoch} samples/epoch, {steps_per_epoch} steps/epoch, "
             f"{steps_per_epoch * cfg.epochs} steps")
    if samples_per_epoch < layout.effective_batch:
        log.warning(f"an epoch holds {samples_per_epoch} samples, fewer than one effective batch "
                    f"({layout.effective_batch}): each step trains on those {samples_per_epoch}; lower "
                    f"--batch-size or --accum-freq (or --global-batch-size) for the batch you mean")
    if cfg.warmup >= steps_per_epoch * cfg.epochs:
        log.warning(f"--warmup {cfg.warmup} is not shorter than the run ({steps_per_epoch * cfg.epochs} "
                    f"steps): the lr never reaches --lr {cfg.lr:g}; lower --warmup")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)  # seed + rank may pass numpy's range
    torch.manual_seed(seed)


def data_spec(cfg: TrainConfig, world: World, layout: BatchLayout, *, train: bool) -> DataSpec:
    """Training and validation data are split across ranks (validation without padding:
    no sample is counted twice; evaluate gathers the ranks' features)."""
    return DataSpec(
        paths=cfg.train_data if train else cfg.val_data,
        dataset_type=cfg.dataset_type, batch_size=layout.batch_size,
        num_samples=cfg.train_num_samples if train else cfg.val_num_samples,
        resampled=cfg.dataset_resampled and train, workers=cfg.workers, seed=cfg.seed,
        step_batches=layout.accum_freq if train else 1,
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
