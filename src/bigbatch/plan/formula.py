"""The peak GPU memory of one optimizer step of `cached_backward`, term by term.

The prediction follows the step's phases (docs/design.md section 2); all sizes are per rank, in bytes:

    W  weights (parameters and buffers: fp32 under autocast, which keeps fp32 master
       weights; bf16/fp16 with pure_bf16/pure_fp16; open_clip's bf16/fp16 casts the
       matrix products' weights only), and with --ema-decay their moving average, a
       second copy on the device
    G  gradients, one per trainable parameter in its dtype
    O  AdamW state, two moments per trainable parameter in its dtype (frozen ones have none)
    I  the step's inputs on the device: all K micro-batches (uint8 images, normalised
       by the image tower's first op; int64 tokens); one micro-batch with --offload-inputs
       (two while the next one's copy overlaps the forward)
    A  activations of ONE micro-batch: the tensors its forward saves for backward
       (autocast's low-precision weight copies included; measured: bigbatch.plan.measure)
    F  the rank's cached features, n = b x K rows of (D_image + D_text): concatenated into
       leaves (the micro-batches' outputs are freed then), and their gradients (F_grad)
    L  the loss's working set (`bigbatch.tiled.loss_working_set_bytes`): logits (blocks),
       float32 accumulators, plus the all-gathered features across ranks; a tiled loss's
       float32 accumulators become F_grad, so they are counted there, once

1. Pass 1 embeds K - 1 micro-batches without grad (a few layers' outputs at a time) and
   the last one with grad: its graph, A, stays alive through the loss.
2. The loss runs once over the cached features. `optimizer.zero_grad(set_to_none=True)`
   left no gradients yet (DDP's zeroed buckets: below):   W + O + I + A + F + F_grad + L
3. Pass 2 back-propagates the kept graph, then recomputes each micro-batch; the logits
   are gone, the gradients have arrived:   W + O + I + A + F_grad + G + T
   where T is the largest parameter's gradient, made apart before it is added to .grad
   (K = 1 on one process: backward frees the activations as the gradients arrive, one
   tower after the other: W + O + I + max(A, G + A / 2))
4. The step (fused AdamW, in place; clipping scales in place): W + O + I + G, below phase 3

    peak = W + O + I + max(A + F + F_grad + L,  A + F_grad + G + T)

With K = 1 nothing is cached (F = 0) and the loss runs on the graph's own outputs.
A distillation teacher (--distill-model) adds its weights to W, its cached features
(n rows of its two embeddings, no gradients; freed after the loss) to the loss phase, the
distillation term to L, and a third phase: pass 1's last micro-batch, whose graph A is
kept while the teacher embeds it without grad (its inference peak, I_T):
                                      A + F + F_teacher + I_T
Under DDP (W > 1, not --fsdp) its gradient buckets, G, are allocated from the start and
.grad are views of them (zeroed between steps, never dropped): G in every phase, once.
Once, at the second step's first forward with grad, DDP rebuilds its buckets in the order
the gradients came, the new beside the old, with pass 1's other features cached:
                                      F x (K - 1) / K + 2 G
--fsdp is planned unsharded (an upper bound).
Backward's transients (a layer's input gradients), the CUDA context and the allocator's
fragmentation are not in the formula: a plan must fit `gpu_memory x (1 - reserve)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bigbatch.device import resolve_precision
from bigbatch.losses import create_loss
from bigbatch.plan.sizes import DEFAULT_RESERVE
from bigbatch.tiled import loss_working_set_bytes

FLOAT32 = 4
# PlanOptions' fields TrainConfig has too
TRAIN_FIELDS = ("model", "precision", "grad_checkpointing", "local_loss", "loss_tile_size", "siglip",
                "offload_inputs", "force_patch_dropout", "ema_decay", "distill_model", "fsdp")


@dataclass(frozen=True)
class PlanOptions:
    """What a plan is for, besides the micro-batch and accum-freq. Fields shared with
    `bigbatch train` have its names and defaults (TrainConfig)."""

    model: str                            # open_clip name, bigbatch-tiny/-small, or a config JSON
    world_size: int = 1                   # GPUs (ranks)
    precision: str = "auto"               # as train's: auto = amp on CUDA, fp32 on CPU
    grad_checkpointing: bool = False
    local_loss: bool = False              # with world_size > 1: --local-loss --gather-with-grad
    loss_tile_size: int | None = None     # None: the loss's own rule (tile only large batches)
    siglip: bool = False
    offload_inputs: bool = False
    force_patch_dropout: float | None = None
    ema_decay: float | None = None        # an EMA of the weights: a second copy of them
    distill_model: str | None = None      # a frozen teacher: its weights, features and loss term
    fsdp: bool = False                    # FSDP2 across the ranks: no DDP buckets
    target: str = "cuda"                  # the device type the run trains on ("cpu": CPU
                                          # autocast and CPU attention kernels)
    device: str = "cpu"                   # where to estimate: "cpu"/"meta" on fake tensors,
                                          # "cuda"/"cuda:N" a real probe of one micro-batch
    gpu_memory: int | None = None         # bytes of one GPU, for `fits`
    reserve: float = DEFAULT_RESERVE      # fraction of it kept free

    @classmethod
    def from_config(cls, config, **rest) -> PlanOptions:
        """The options of a training run (a TrainConfig, or a command's parsed flags): the
        fields named alike (TRAIN_FIELDS) from `config`, `rest` for the others."""
        return cls(**{name: getattr(config, name) for name in TRAIN_FIELDS
                      if name not in rest and hasattr(config, name)}, **rest)

    @property
    def resolved_precision(self) -> str:
        """As bigbatch.device resolves it for the target: fp32, amp, amp_bf16, or one that
        casts the weights (pure_bf16, pure_fp16, bf16, fp16)."""
        return resolve_precision(self.precision, torch.device(self.target))

    @property
    def probes(self) -> bool:
        return str(self.device).startswith("cuda")


@dataclass(frozen=True)
class Profile:
    """What the model and one micro-batch of `batch_size` cost; independent of K and W."""

    batch_size: int
    param_bytes: int
    buffer_bytes: int
    trainable_bytes: int           # of the trainable parameters (their gradients: as many)
    largest_trainable_bytes: int   # of the largest trainable tensor (T = its gradient)
    input_bytes_per_sample: int    # uint8 images + int64 tokens
    feature_bytes_per_sample: int  # (D_image + D_text) x the features' element size
    feature_element_size: int      # 4: float32 features (open_clip normalises them in fp32)
    embed_dim: int
    activations: int | None        # saved for backward (probe: peak above the fixed costs)
    checkpointed: int | None       # the same with grad checkpointing (None: not measured)
    checkpoint_kept: int | None = None  # checkpointed: saved outside the blocks + block inputs
    teacher_bytes: int = 0              # --distill-model's parameters and buffers
    teacher_feature_bytes_per_sample: int = 0  # its two embeddings, cached for the loss
    teacher_inference_fixed_bytes: int = 0       # the peak of its forward without grad:
    teacher_inference_bytes_per_sample: int = 0  # fixed + per sample x the micro-batch


@dataclass
class MemoryPlan:
    """Predicted per-rank memory of one optimizer step; sizes in bytes (see module docstring)."""

    model: str
    batch_size: int            # micro-batch per rank, b
    accum_freq: int            # micro-batches per step, K
    world_size: int            # W
    global_batch_size: int     # b x K x W
    precision: str
    grad_checkpointing: bool
    weights: int               # W (with --ema-decay: + ema_weights)
    gradients: int             # G
    gradient_transient: int    # T: the largest gradient, made apart before it joins .grad
    optimizer_state: int       # O
    inputs: int                # I
    activations: int           # A, one micro-batch
    cached_features: int       # F + F_grad (0 when K = 1)
    loss_working_set: int      # L
    peak: int
    phase: str                 # where the peak is: "loss", "pass 2" (with a teacher "pass 1",
                               # under DDP "bucket rebuild")
    source: str                # "meta estimate" or "probe on cuda"
    target: str = "cuda"       # the device type modelled
    offload_inputs: bool = False
    local_loss: bool = False
    loss_tile: int | None = None
    activations_checkpointed: int | None = None  # A with --grad-checkpointing, when known
    gpu_memory: int | None = None
    reserve: float = DEFAULT_RESERVE
    ema_weights: int = 0       # --ema-decay's copy of the weights, part of `weights`
    teacher_weights: int = 0   # --distill-model's, part of `weights`
    teacher_features: int = 0  # its cached features, part of `cached_features`
    teacher_inference: int = 0  # the peak of its forward over one micro-batch (pass 1)
    ddp_buckets: int = 0        # DDP's gradient buckets (= gradients), in every phase
    phase_peaks: dict = field(default_factory=dict)  # each phase's peak (bytes)

    @property
    def usable_memory(self) -> int | None:
        return None if self.gpu_memory is None else int(self.gpu_memory * (1 - self.reserve))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak <= self.usable_memory


def assemble(profile: Profile, activations: int, b: int, K: int, o: PlanOptions) -> MemoryPlan:
    """The peak formula of the module docstring, term by term."""
    W, n = o.world_size, b * K  # n: this rank's samples in the step
    ema_weights = profile.param_bytes + profile.buffer_bytes if o.ema_decay else 0
    weights = profile.param_bytes + profile.buffer_bytes + ema_weights + profile.teacher_bytes
    teacher_features = profile.teacher_feature_bytes_per_sample * n
    gradients = profile.trainable_bytes  # under DDP also its buckets: `resident` below
    optimizer_state = 2 * profile.trainable_bytes  # AdamW's moments take the parameters' dtype
    inputs = (min(2 * b, n) if o.offload_inputs else n) * profile.input_bytes_per_sample
    row = profile.feature_bytes_per_sample
    feature_grads = row * n if K > 1 else 0
    cached = row * n + feature_grads if K > 1 else 0
    teacher_dim = profile.teacher_feature_bytes_per_sample // (2 * profile.feature_element_size)
    loss_ws, loss_tile = loss_working_set(n, o, profile.embed_dim,
                                          row + profile.teacher_feature_bytes_per_sample, teacher_dim)
    if loss_tile is not None and profile.feature_element_size == FLOAT32:
        # the tiled loss's float32 gradient accumulators become the features' gradients
        loss_ws = max(0, loss_ws - feature_grads)
    # pass 2: the gradients arrive while the activations are freed. With K > 1 they are all
    # there while later micro-batches are recomputed, each new gradient made apart before it
    # is added to .grad (the largest: T); DDP's buckets exist from the start. A plain step on
    # one process: the towers run backward one after the other, so about one tower's
    # activations can outlive the other's gradients
    transient = 0 if K == 1 and W == 1 else profile.largest_trainable_bytes
    if K == 1 and W == 1:
        pass_2 = max(activations, gradients + activations // 2)
    else:
        pass_2 = activations + gradients + transient
    # DDP's gradient buckets are allocated once, for the whole run, and .grad are views of
    # them (zeroed between steps, not dropped): G in every phase, pass 2's G among them
    resident = gradients if W > 1 and not o.fsdp else 0
    phases = {"loss": activations + cached + teacher_features + loss_ws + resident,
              "pass 2": pass_2 + feature_grads}
    if resident:  # once, at step 2's first forward with grad (pass 1's last micro-batch), DDP
        # rebuilds its buckets in the order the gradients came: the new beside the old
        phases["bucket rebuild"] = (row * n + teacher_features) * (K - 1) // K + 2 * resident
    inference = 0
    if profile.teacher_bytes:  # the last micro-batch's graph kept while the teacher embeds it
        inference = profile.teacher_inference_fixed_bytes + profile.teacher_inference_bytes_per_sample * b
        phases["pass 1"] = activations + row * n + teacher_features + inference + resident
    phase = max(phases, key=phases.get)
    return MemoryPlan(
        model=o.model, batch_size=b, accum_freq=K, world_size=W, global_batch_size=n * W,
        precision=o.resolved_precision, grad_checkpointing=o.grad_checkpointing, weights=weights,
        gradients=gradients, gradient_transient=transient, optimizer_state=optimizer_state,
        inputs=inputs, activations=activations,
        cached_features=cached + teacher_features, loss_working_set=loss_ws,
        peak=weights + optimizer_state + inputs + phases[phase], phase=phase,
        phase_peaks={name: weights + optimizer_state + inputs + size for name, size in phases.items()},
        source="probe on cuda" if o.probes else "meta estimate",
        target=o.target, offload_inputs=o.offload_inputs, local_loss=o.local_loss,
        loss_tile=loss_tile, activations_checkpointed=profile.checkpointed, gpu_memory=o.gpu_memory,
        reserve=o.reserve, ema_weights=ema_weights, teacher_weights=profile.teacher_bytes,
        teacher_features=teacher_features, teacher_inference=inference, ddp_buckets=resident)


def loss_working_set(n: int, o: PlanOptions, dim: int, row_bytes: int,
                     teacher_dim: int | None = None) -> tuple[int, int | None]:
    """The loss's bytes beyond the cached features, and its tile (None: the plain loss).

    Rows are this rank's n samples under --local-loss, else all N = n x W. Across ranks
    the features (and a teacher's) are all-gathered first: (n, D_i + D_t) concatenated,
    then (N, D_i + D_t).
    """
    N = n * o.world_size
    local = o.local_loss and o.world_size > 1
    rows = n if local else N
    name = "distill" if o.distill_model else "siglip" if o.siglip else "clip"
    loss = create_loss(name, local_loss=local, gather_with_grad=local, world_size=o.world_size,
                       tile_size=o.loss_tile_size)
    block = loss.tile(rows, N)  # the loss's own rule: tile_size, or tile only large batches
    working = loss_working_set_bytes(rows, N, dim, tile=block, tiled=block is not None, loss=name,
                                     teacher_dim=teacher_dim)
    gathered = row_bytes * (n + N) if o.world_size > 1 else 0
    return working + gathered, block
