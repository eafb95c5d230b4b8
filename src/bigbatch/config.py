"""All training options: one frozen dataclass, exposed as flags (open_clip_train's names)
and YAML by bigbatch.parse. `validate` stops a bad combination before any work starts,
with one message that names the fix. What the options resolve to once the world is known
(the batch layout, the run's name and folder) is `Run`, also frozen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bigbatch.aug_cfg import check_aug_cfg
from bigbatch.errors import SIGLIP_WITH_TEACHER, ConfigError


def option(default: Any, help: str, group: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata=dict(help=help, group=group, **argparse_kwargs))


PRECISIONS = ["auto", "fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16"]


@dataclass(frozen=True)
class TrainConfig:
    # --- data
    train_data: str | None = option(None, "training data: webdataset shards ('dir/{000000..000099}.tar') or a CSV; several sources joined with '::'", "data")
    val_data: str | None = option(None, "validation data, same formats as --train-data", "data")
    dataset_type: str = option("auto", "format of the data ('auto' picks by file extension)", "data", choices=["auto", "webdataset", "csv", "synthetic"])
    train_num_samples: int | None = option(None, "samples per epoch (webdataset: read from sizes.json next to the shards if omitted)", "data")
    val_num_samples: int | None = option(None, "samples in the validation set (optional)", "data")
    dataset_resampled: bool = option(False, "sample shards with replacement (webdataset)", "data")
    train_data_upsampling_factors: str | None = option(None, "with --dataset-resampled and several '::'-joined sources: how often each source's shards are drawn, '::'-joined (e.g. 1::2::0.5; default: every shard alike)", "data")
    csv_img_key: str = option("filepath", "CSV column holding image paths (relative to the CSV's folder)", "data")
    csv_caption_key: str = option("title", "CSV column holding captions", "data")
    csv_label_key: str | None = option(None, "CSV column of integer class ids, for zero-shot evaluation", "data")
    csv_separator: str = option("\t", "CSV separator", "data")
    workers: int = option(1, "data loader processes per GPU/rank", "data")
    batch_size: int | str = option(64, "micro-batch size per GPU/rank (one forward); 'auto': the largest that fits the GPU (bigbatch plan)", "data")
    seed: int = option(0, "random seed (data order, initialisation, dropout)", "data")
    cache_dir: str | None = option(None, "where open_clip looks for pretrained weights and tokenizer files (default: its own cache; nothing is downloaded)", "data")
    # --- model
    model: str = option("ViT-B-32", "an open_clip model name (open_clip.list_models()), bigbatch's CPU-sized bigbatch-tiny or bigbatch-small, or a path to a model config JSON", "model")
    pretrained: str | None = option(None, "weights to start from: a checkpoint file (bigbatch's or open_clip's) or an open_clip pretrained tag whose weights are in the local cache", "model")
    siglip: bool = option(False, "use the SigLIP sigmoid loss (learnable logit bias) instead of CLIP's softmax loss", "model")
    force_patch_dropout: float | None = option(None, "override the image tower's patch dropout (0 disables)", "model")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory (open_clip towers)", "model")
    pretrained_image: bool = option(False, "start the image tower from timm's ImageNet weights (timm towers; must be in timm's local cache)", "model")
    force_image_size: list[int] | None = option(None, "override the model's image size (one number, or height width)", "model", nargs="+")
    force_context_length: int | None = option(None, "override the text context length (model and tokenizer)", "model")
    force_quick_gelu: bool = option(False, "use QuickGELU activations (as OpenAI's weights need) in a non-OpenAI config", "model")
    force_custom_text: bool = option(False, "build a CustomTextCLIP (separate text tower module)", "model")
    use_bnb_linear: str | None = option(None, "replace the towers' MLP linear layers by this bitsandbytes class (needs bitsandbytes)", "model")
    # --- preprocessing (open_clip's transforms)
    image_mean: list[float] | None = option(None, "override the normalisation mean (one value per channel)", "preprocessing", nargs="+")
    image_std: list[float] | None = option(None, "override the normalisation std (one value per channel)", "preprocessing", nargs="+")
    image_interpolation: str | None = option(None, "resize interpolation", "preprocessing", choices=["bicubic", "bilinear", "random"])
    image_resize_mode: str | None = option(None, "evaluation resize: 'shortest' side + centre crop, 'longest' side + pad, or 'squash'", "preprocessing", choices=["shortest", "longest", "squash"])
    aug_cfg: dict | None = option(None, "training augmentation as key=value pairs of open_clip's AugmentationCfg (scale='(0.5, 1.0)' color_jitter=0.4 use_timm=True re_prob=0.25 ...)", "preprocessing", nargs="*")
    coca_caption_loss_weight: float = option(2.0, "CoCa models: weight of the caption loss (taken per micro-batch in pass 2, its logits never cached)", "model")
    coca_contrastive_loss_weight: float = option(1.0, "CoCa models: weight of the contrastive loss", "model")
    distill_model: str | None = option(None, "distil from this frozen teacher (an open_clip model reading the student's images and tokens): CLIP's loss plus open_clip's distillation term, exact with --accum-freq (the teacher runs once per sample)", "model")
    distill_pretrained: str | None = option(None, "weights of --distill-model: a checkpoint file, or an open_clip pretrained tag whose weights are in the local cache", "model")
    torchcompile: bool = option(False, "torch.compile the model (in place; dropout still replayed exactly in pass 2)", "model")
    torchscript: bool = option(False, "refused: TorchScript is deprecated; export with `bigbatch export` instead", "model")
    trace: bool = option(False, "refused: a traced model cannot train; export with `bigbatch export` instead", "model")
    # --- fine-tuning
    lock_image: bool = option(False, "freeze the image tower (a fully frozen tower runs in eval mode, once per sample)", "fine-tuning")
    lock_image_unlocked_groups: int = option(0, "leave the last N layer groups of a locked image tower trainable", "fine-tuning")
    lock_image_freeze_bn_stats: bool = option(False, "freeze BatchNorm running statistics in locked image layers", "fine-tuning")
    lock_text: bool = option(False, "freeze the text tower (a fully frozen tower runs in eval mode, once per sample)", "fine-tuning")
    lock_text_unlocked_layers: int = option(0, "leave the last N layers of a locked text tower trainable", "fine-tuning")
    lock_text_freeze_layer_norm: bool = option(False, "also freeze LayerNorm in the locked text layers (open_clip's own text tower always does)", "fine-tuning")
    layer_decay: float | None = option(None, "layer-wise lr decay: layer l of L gets lr x decay^(L+1-l) (e.g. 0.75)", "fine-tuning")
    lr_image: float | None = option(None, "peak lr of the image tower (default: --lr)", "fine-tuning")
    lr_text: float | None = option(None, "peak lr of the text tower (default: --lr)", "fine-tuning")
    ema_decay: float | None = option(None, "keep an exponential moving average of the weights (e.g. 0.999) and evaluate it", "fine-tuning")
    # --- optimisation
    epochs: int = option(32, "passes over the training data", "optimization")
    lr: float = option(5e-4, "peak learning rate (tied to the global batch, see README)", "optimization")
    wd: float = option(0.2, "AdamW weight decay (not applied to gains, biases, logit scale/bias)", "optimization")
    beta1: float = option(0.9, "AdamW beta1", "optimization")
    beta2: float | None = option(None, "AdamW beta2 (default, as open_clip_train: 0.98 for ViT models, 0.999 for others)", "optimization")
    eps: float | None = option(None, "AdamW epsilon (default, as open_clip_train: 1e-6 for ViT models, 1e-8 for others)", "optimization")
    warmup: int = option(10000, "linear warmup, in optimizer steps", "optimization")
    lr_scheduler: str = option("cosine", "learning-rate schedule after warmup: cosine to 0, constant, or constant then a cooldown (--epochs-cooldown)", "optimization", choices=["cosine", "const", "const-cooldown"])
    epochs_cooldown: int | None = option(None, "const-cooldown: the last N epochs decay the lr to --lr-cooldown-end", "optimization")
    lr_cooldown_end: float = option(0.0, "const-cooldown: the lr at the end of the cooldown", "optimization")
    lr_cooldown_power: float = option(1.0, "const-cooldown: the decay's power (1: linear)", "optimization")
    skip_scheduler: bool = option(False, "no schedule, no warmup: every step at --lr", "optimization")
    opt: str = option("adamw", "optimizer: adamw, sgd (with --momentum), or timm/NAME (timm's create_optimizer_v2)", "optimization")
    momentum: float | None = option(None, "SGD / timm optimizers: momentum", "optimization")
    accum_freq: int = option(1, "micro-batches per optimizer step; exact feature-cached accumulation", "optimization")
    global_batch_size: int | None = option(None, "the effective batch to reach: sets --accum-freq to G / (batch-size x world-size)", "optimization")
    offload_inputs: bool = option(False, "keep the step's cached micro-batch inputs in pinned host memory, not on the GPU (for huge --accum-freq)", "optimization")
    loss_tile_size: int | None = option(None, "compute the loss in (tile x tile) blocks, O(N x tile) memory (default: plain up to 8192^2 logits, tiles of 4096 above)", "optimization")
    grad_clip_norm: float | None = option(None, "clip the accumulated gradient to this global norm", "optimization")
    max_nonfinite_steps: int = option(5, "a step with a non-finite loss or gradient is not applied; stop after this many in a row (0: never stop)", "optimization")
    # --- precision and device
    precision: str = option("auto", "'auto' = amp on CUDA, fp32 on CPU; amp/amp_bf16 (= amp_bfloat16): fp32 weights under autocast; pure_bf16/pure_fp16: the weights themselves in bf16/fp16, no autocast; bf16/fp16: open_clip's low-precision matmul weights", "precision", choices=PRECISIONS)
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'", "precision")
    threads: int | None = option(None, "CPU threads for torch's operations (default: torch's choice, one per core); lower it when other CPU-bound work shares the machine", "precision")
    # --- distributed (launch with torchrun or srun; one process per GPU)
    local_loss: bool = option(False, "each rank takes the loss rows of its own samples against all gathered columns: O(n x N) instead of O(N x N) (needs --gather-with-grad)", "distributed")
    gather_with_grad: bool = option(False, "all-gather features with gradients flowing back to their rank", "distributed")
    dist_backend: str = option("auto", "process-group backend: nccl on GPUs, gloo on CPU", "distributed", choices=["auto", "nccl", "gloo"])
    fsdp: bool = option(False, "shard weights, gradients and optimizer state with FSDP2 (fully_shard) instead of DDP", "distributed")
    dist_url: str | None = option(None, "init_method of the process group (default: torchrun's env://)", "distributed")
    no_set_device_rank: bool = option(False, "every rank uses cuda:0 (one GPU visible per process)", "distributed")
    ddp_static_graph: bool = option(False, "DDP(static_graph=True)", "distributed")
    use_bn_sync: bool = option(False, "convert BatchNorm to SyncBatchNorm (statistics over all ranks' micro-batches)", "distributed")
    loss_dist_impl: str | None = option(None, "SigLIP's distributed exchange in open_clip (bidir, shift, reduce, gather): accepted; bigbatch always all-gathers the features once per step, the same loss and gradient", "distributed")
    horovod: bool = option(False, "refused: launch with torchrun or srun instead", "distributed")
    # --- logging
    logs: str = option("./logs", "where runs are written (one folder per --name)", "logging")
    name: str | None = option(None, "run name (default: date, model, lr and batch)", "logging")
    log_every_n_steps: int = option(100, "print and log progress every N optimizer steps", "logging")
    log_local: bool = option(False, "every node's first process writes its own out-RANK.log", "logging")
    debug: bool = option(False, "log debug messages too", "logging")
    copy_codebase: bool = option(False, "copy the bigbatch package that runs into the run folder (code/)", "logging")
    report_to: str = option("", "'tensorboard', 'wandb' or both comma-separated ('all': both)", "logging")
    wandb_project_name: str = option("open-clip", "Weights & Biases project", "logging")
    wandb_notes: str = option("", "Weights & Biases run notes", "logging")
    remote_sync: str | None = option(None, "also copy the run folder to this fsspec URL or path (under its --name), every --remote-sync-frequency seconds and at the end", "logging")
    remote_sync_frequency: int = option(300, "seconds between remote syncs", "logging")
    remote_sync_protocol: str = option("fsspec", "both copy with fsspec (s3:// needs s3fs)", "logging", choices=["s3", "fsspec"])
    # --- checkpoints
    save_frequency: int = option(1, "save a checkpoint every N epochs (0: never)", "checkpoints")
    save_every_n_steps: int = option(0, "also save epoch_latest.pt every N optimizer steps inside an epoch (0: only at epoch ends); a run resumed from it leaves out the batches already trained on", "checkpoints")
    resume: str | None = option(None, "'latest' (needs --name) or a checkpoint path to continue from", "checkpoints")
    save_most_recent: bool = option(False, "accepted: epoch_latest.pt is always written", "checkpoints")
    delete_previous_checkpoint: bool = option(False, "keep only the newest epoch_N.pt (and epoch_latest.pt)", "checkpoints")
    # --- evaluation
    val_frequency: int = option(1, "evaluate on --val-data every N epochs (0: never)", "evaluation")
    zeroshot_frequency: int = option(2, "zero-shot classification every N epochs (0: never)", "evaluation")
    zeroshot_classnames: str | None = option(None, "class names in label order: a built-in set ('imagenet') or a text file, one per line", "evaluation")
    zeroshot_templates: str = option("openai", "prompt templates: a built-in set ('openai': 80, 'simple': 7) or a text file, one per line with '{}' for the class name", "evaluation")
    imagenet_val: str | None = option(None, "ImageNet-1k validation as an ImageFolder tree (1000 synset folders): zero-shot top-1/5 every --zeroshot-frequency epochs", "evaluation")
    imagenet_v2: str | None = option(None, "ImageNetV2 as an ImageFolder tree (synset folders, or folders 0..999)", "evaluation")


@dataclass(frozen=True)
class BatchLayout:
    """The batch as resolved for this world (--batch-size auto and --global-batch-size
    decided, --offload-inputs chosen where needed)."""

    batch_size: int  # samples per micro-batch per rank: one forward
    accum_freq: int  # micro-batches per optimizer step
    world_size: int = 1
    offload_inputs: bool = False  # the step's cached inputs wait in pinned host memory

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: batch-size x accum-freq x world-size."""
        return self.batch_size * self.accum_freq * self.world_size


@dataclass(frozen=True)
class Run:
    """What a run is once started: its name, its folder (logs/NAME) and its batch layout."""

    name: str
    dir: Path
    layout: BatchLayout


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError naming the fix for the first bad value or combination."""
    for f in fields(cfg):  # argparse checks choices of flags, not of YAML values
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) is not None and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{flag_name(f.name)} {getattr(cfg, f.name)!r}: choose one of {choices}")
    refuse_non_finite(cfg, [f.name for f in fields(cfg)])  # NaN passes every comparison below
    positive = ["accum_freq", "epochs", "log_every_n_steps"]
    if cfg.threads is not None:
        positive.append("threads")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{flag_name(name)} must be at least 1, got {getattr(cfg, name)}")
    non_negative = ["workers", "warmup", "save_frequency", "save_every_n_steps", "val_frequency",
                    "lock_image_unlocked_groups", "lock_text_unlocked_layers",
                    "max_nonfinite_steps",
                    "zeroshot_frequency", "wd",
                    "coca_caption_loss_weight", "coca_contrastive_loss_weight"]
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{flag_name(name)} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.batch_size != "auto" and cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 or 'auto', got {cfg.batch_size}")
    check_batch_sizes(global_batch_size=cfg.global_batch_size, batch_size=cfg.batch_size,
                      accum_freq=cfg.accum_freq)
    if not 0 <= cfg.seed < 2 ** 32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    beta1, beta2, eps = adamw_hyperparameters(cfg)
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ConfigError("--beta1 and --beta2 must be in [0, 1)")
    if not eps > 0:
        raise ConfigError(f"--eps must be positive, got {eps}")
    check_step_options(cfg)
    if cfg.grad_clip_norm is not None and cfg.grad_clip_norm <= 0:
        raise ConfigError("--grad-clip-norm must be positive (omit it to disable clipping)")
    if cfg.train_data is None and cfg.dataset_type != "synthetic" and not evaluation_only(cfg):
        raise ConfigError("no training data: pass --train-data (shards or CSV) or --dataset-type "
                          "synthetic (or, to evaluate a model, --val-data / --imagenet-val without it)")
    if cfg.dataset_type == "synthetic" and cfg.train_data is not None:
        raise ConfigError("--dataset-type synthetic draws its own data: drop --train-data or pick another --dataset-type")
    _check_zeroshot_sets(cfg)
    if cfg.global_batch_size is not None and cfg.accum_freq != 1:
        raise ConfigError("--global-batch-size sets --accum-freq (G / (batch-size x world-size)): "
                          "give one of them, not both")
    if cfg.name is not None and (not cfg.name.strip() or Path(cfg.name).is_absolute()
                                 or ".." in Path(cfg.name).parts):
        raise ConfigError(f"--name {cfg.name!r}: the run's folder inside --logs (no '..', not absolute): "
                          f"put where runs go in --logs")
    if cfg.resume == "latest" and cfg.name is None:
        raise ConfigError("--resume latest continues a named run: also pass --name of that run")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_file():
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint (use 'latest' or a path to a .pt file)")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ConfigError("--layer-decay must be in (0, 1], e.g. 0.75")
    if cfg.ema_decay is not None and cfg.fsdp:
        raise ConfigError("--ema-decay keeps a full copy of the weights on every rank, which "
                          "--fsdp is there to avoid: drop one of them")
    for name in ("lr_image", "lr_text"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"--{flag_name(name)} must be 0 or more")
    if cfg.local_loss and not cfg.gather_with_grad:
        raise ConfigError("--local-loss needs --gather-with-grad (otherwise the other ranks' "
                          "gradient with respect to this rank's features is lost)")
    if (cfg.distill_model is None) != (cfg.distill_pretrained is None):
        raise ConfigError("distillation needs both --distill-model and --distill-pretrained "
                          "(the teacher and its weights), or neither")
    if cfg.distill_model is not None and cfg.siglip:
        raise ConfigError(SIGLIP_WITH_TEACHER)
    _validate_peer_options(cfg)
    if cfg.pretrained == "":  # open_clip_train's default: no weights
        cfg = dataclasses.replace(cfg, pretrained=None)
    return cfg


def refuse_non_finite(options, names) -> None:
    """NaN or inf in any of these options (floats, or lists of them) is refused."""
    for name in names:
        values = getattr(options, name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{flag_name(name)} must be a finite number, got {value}")


def check_step_options(options) -> None:
    """The options of a step's memory that `bigbatch plan` shares with train (a TrainConfig
    or the plan's parsed flags): the same refusals in both."""
    refuse_non_finite(options, ("force_patch_dropout", "loss_tile_size", "ema_decay"))
    if options.loss_tile_size is not None and options.loss_tile_size < 1:
        raise ConfigError("--loss-tile-size must be at least 1 (omit it for the automatic choice)")
    if options.force_patch_dropout is not None and not 0 <= options.force_patch_dropout < 1:
        raise ConfigError("--force-patch-dropout must be in [0, 1)")
    if options.ema_decay is not None and not 0 < options.ema_decay < 1:
        raise ConfigError("--ema-decay must be in (0, 1), e.g. 0.999")


def check_batch_sizes(**sizes: int | str | None) -> None:
    """Each given size (global_batch_size, batch_size, accum_freq, world_size: None or 'auto'
    when not given) a positive integer of at most MAX_BATCH: more samples a step than any
    data set holds is a typo, and the divisor searches would not end."""
    for name, value in sizes.items():
        if value is None or value == "auto":
            continue
        if not 1 <= value <= MAX_BATCH:
            raise ConfigError(f"--{flag_name(name)} must be between 1 and 2**32 ({MAX_BATCH:,}), got {value}")


def adamw_hyperparameters(cfg: TrainConfig) -> tuple[float, float, float]:
    """beta1, beta2 and eps; those not given are open_clip_train's defaults (CLIP's paper's):
    0.98 and 1e-6 for a model whose name holds "vit" (and bigbatch's own configs, ViTs),
    0.999 and 1e-8 for the others."""
    vit = "vit" in cfg.model.lower() or cfg.model.startswith("bigbatch-")
    return (cfg.beta1, (0.98 if vit else 0.999) if cfg.beta2 is None else cfg.beta2,
            (1e-6 if vit else 1e-8) if cfg.eps is None else cfg.eps)


MAX_BATCH = 2 ** 32  # samples (or micro-batches) a step: beyond any data set's epoch
LOSS_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
REPORT_TO = ("tensorboard", "wandb", "all")


def _validate_peer_options(cfg: TrainConfig) -> None:
    """The options open_clip_train users bring (see bigbatch.peer_flags)."""
    from bigbatch.peer_flags import refusal
    if (message := refusal(cfg)) is not None:
        raise ConfigError(message)
    if cfg.lr_scheduler == "const-cooldown" and cfg.epochs_cooldown is None:
        raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown N (the last N "
                          "epochs decay the lr to --lr-cooldown-end)")
    if cfg.epochs_cooldown is not None and not 0 < cfg.epochs_cooldown <= cfg.epochs:
        raise ConfigError(f"--epochs-cooldown must be between 1 and --epochs ({cfg.epochs}), "
                          f"got {cfg.epochs_cooldown}")
    if cfg.lr_cooldown_end < 0 or cfg.lr_cooldown_power <= 0:
        raise ConfigError("--lr-cooldown-end must be 0 or more and --lr-cooldown-power positive")
    if cfg.opt not in ("adamw", "sgd") and not cfg.opt.startswith("timm/"):
        raise ConfigError(f"--opt {cfg.opt}: choose adamw, sgd, or timm/NAME (any timm optimizer)")
    if cfg.momentum is not None and not 0 <= cfg.momentum < 1:
        raise ConfigError("--momentum must be in [0, 1)")
    if cfg.force_image_size is not None and (len(cfg.force_image_size) not in (1, 2)
                                             or min(cfg.force_image_size) < 1):
        raise ConfigError("--force-image-size takes one size, or height and width, in pixels (at least 1)")
    if cfg.force_context_length is not None and cfg.force_context_length < 1:
        raise ConfigError("--force-context-length must be at least 1")
    for name in ("image_mean", "image_std"):
        values = getattr(cfg, name)
        if values is not None and len(values) not in (1, 3):
            raise ConfigError(f"--{flag_name(name)} takes one value, or one per RGB channel (3)")
    if cfg.image_std is not None and min(cfg.image_std) <= 0:
        raise ConfigError("--image-std values must be positive")
    if cfg.aug_cfg:
        check_aug_cfg(cfg.aug_cfg)
    if cfg.train_data_upsampling_factors is not None:
        _check_upsampling(cfg)
    reports = [r.strip() for r in cfg.report_to.split(",") if r.strip()]
    if any(r not in REPORT_TO for r in reports):
        raise ConfigError(f"--report-to {cfg.report_to!r}: give tensorboard, wandb, both "
                          f"comma-separated, or all")
    if ("wandb" in reports or "all" in reports) and not _installed("wandb"):
        raise ConfigError("--report-to wandb needs the wandb package: pip install wandb "
                          "(or pip install 'bigbatch[wandb]')")
    if cfg.use_bnb_linear is not None and not _installed("bitsandbytes"):
        raise ConfigError(f"--use-bnb-linear {cfg.use_bnb_linear} needs the bitsandbytes package: "
                          f"pip install bitsandbytes (or drop the flag)")
    if cfg.loss_dist_impl is not None and cfg.loss_dist_impl not in LOSS_DIST_IMPLS:
        raise ConfigError(f"--loss-dist-impl {cfg.loss_dist_impl}: choose one of {list(LOSS_DIST_IMPLS)}")
    if cfg.remote_sync_frequency < 1:
        raise ConfigError("--remote-sync-frequency must be at least 1 (seconds)")
    check_imagenet_dirs(cfg.imagenet_val, cfg.imagenet_v2)


def check_imagenet_dirs(imagenet_val: str | None, imagenet_v2: str | None) -> None:
    """--imagenet-val / --imagenet-v2 (train and eval): folders, read when evaluated."""
    for name, path in (("imagenet_val", imagenet_val), ("imagenet_v2", imagenet_v2)):
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"--{flag_name(name)} {path}: no such folder (give an "
                              f"ImageFolder tree, one sub-folder per class)")


def evaluation_only(cfg: TrainConfig) -> bool:
    """open_clip_train's run without --train-data: the model evaluated once on what is given."""
    return (cfg.train_data is None and cfg.dataset_type != "synthetic"
            and any((cfg.val_data, cfg.imagenet_val, cfg.imagenet_v2)))


def wants_report(cfg: TrainConfig, target: str) -> bool:
    """Whether --report-to names `target` ('tensorboard' or 'wandb'; 'all' names both)."""
    reports = {r.strip() for r in cfg.report_to.split(",")}
    return target in reports or "all" in reports


def _installed(package: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(package) is not None



def _check_upsampling(cfg: TrainConfig) -> None:
    if not cfg.dataset_resampled:
        raise ConfigError("--train-data-upsampling-factors weights sources drawn with replacement: "
                          "also pass --dataset-resampled")
    sources = [s for s in (cfg.train_data or "").split("::") if s.strip()]
    try:
        factors = [float(f) for f in cfg.train_data_upsampling_factors.split("::")]
    except ValueError:
        factors = []
    if len(factors) != len(sources) or min(factors, default=-1) < 0 or not any(factors):
        raise ConfigError(f"--train-data-upsampling-factors {cfg.train_data_upsampling_factors}: "
                          f"give one non-negative number per --train-data source ({len(sources)}), "
                          f"'::'-joined, e.g. {'::'.join(['1'] * max(len(sources), 2))}")


def _check_zeroshot_sets(cfg: TrainConfig) -> None:
    """Class names / templates: read now, not after the first epoch of training."""
    if cfg.zeroshot_classnames is None and cfg.zeroshot_templates == TrainConfig.zeroshot_templates:
        return  # no zero-shot evaluation: nothing to read
    from bigbatch.zeroshot import load_classnames, load_templates  # (torch: import late)
    load_templates(cfg.zeroshot_templates, "--zeroshot-templates")
    if cfg.zeroshot_classnames is None:
        raise ConfigError("--zeroshot-templates needs --zeroshot-classnames (the class names in label "
                          "order: 'imagenet' or a text file, one per line)")
    load_classnames(cfg.zeroshot_classnames, "--zeroshot-classnames")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flag_name(name: str) -> str:
    return name.replace("_", "-")
