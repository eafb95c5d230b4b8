"""Contrastive losses over a whole (global) batch: CLIP's softmax and SigLIP's sigmoid;
CLIP's with distillation from a teacher; and CoCa's caption loss, whose terms do not
couple samples.

Both take the model's output dict as keyword arguments, so that
`loss_fn(**model(images, texts))` works and extra keys are ignored. Logits are
computed in float32 whatever the feature dtype: bf16 logits lose the small
differences between negatives that the loss lives on.

Across ranks (world_size > 1) the features of all ranks are gathered once per call (in
`cached_backward`: once per optimizer step) and the loss is over the global batch of N
samples. DDP and FSDP2 then AVERAGE parameter gradients over ranks; each mode is
normalised so that this average is exactly the one-process gradient of the global-batch
loss, and every rank returns the global-batch loss value.

- default: gathered without autograd; every rank takes the whole (N, N) loss, so the
  gradient of its own rows is already complete: it is scaled by world_size to undo the
  averaging. No gradient traffic; an (N, N) working set on every rank.
- gather_with_grad: the same, gathered with autograd; each rank's rows get the sum over
  ranks of one and the same gradient (world_size times the true one, which the
  averaging divides back). Exact; one more reduce-scatter of (N, D).
- local_loss + gather_with_grad (`--local-loss --gather-with-grad`, the scalable mode):
  each rank takes the rows of its own n samples against all N columns, (n, N). Its
  term is world_size times its share of the global loss, so the terms average to the
  global loss; the gather's backward brings home every rank's gradient with respect to
  this rank's columns.
- local_loss alone would lose exactly that gradient: refused with a ValueError.

logit_scale and logit_bias are not gathered: each rank's gradient is that of its own
term, and their average is exact in every mode.

Tiling (`tile_size`, see bigbatch.tiled): a loss over n rows and N columns is taken in
(tile, tile) blocks, never materialising the (n, N) logits, once n * N exceeds
PLAIN_MAX_LOGITS (8192^2: N > 8192 for the whole batch) or whenever tile_size is set.
The same rows, columns and normalisation in every mode; only the working set differs.
Distillation's soft cross-entropy is tiled alike (bigbatch.tiled.soft_cross_entropy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigbatch import tiled
from bigbatch.cross_entropy import token_cross_entropy
from bigbatch.distributed import all_gather_no_grad, all_gather_with_grad, gather_sizes, mean_over_ranks


class _GlobalBatchLoss(nn.Module):
    """Which rows this rank computes, and the gathers and weights that keep that exact."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int = 0, world_size: int = 1, tile_size: int | None = None):
        """tile_size: None tiles only large losses (n * N > tiled.PLAIN_MAX_LOGITS, in
        blocks of tiled.DEFAULT_TILE); an int always tiles, in blocks of that size."""
        super().__init__()
        tiled.choose_tile(1, 1, tile_size)  # validates it
        self.tile_size = tile_size
        if local_loss and not gather_with_grad:
            raise ValueError("--local-loss needs --gather-with-grad: without it each rank loses the "
                             "other ranks' gradient with respect to its features")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    @property
    def local(self) -> bool:
        """Rows of this rank's samples only (one process: all rows, the same loss)."""
        return self.local_loss and self.world_size > 1

    def tile(self, n_rows: int, n_cols: int) -> int | None:
        """The block size for an (n_rows, n_cols) loss; None: the plain matmul."""
        return tiled.choose_tile(n_rows, n_cols, self.tile_size)

    def gather(self, *features: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        """Every rank's features, rank-major, (N, D_k) each; and every rank's row count."""
        if self.world_size == 1:
            return list(features), [features[0].shape[0]]
        self._check_process_group()
        mine = torch.cat(features, dim=1)  # one collective for all of them: (n, sum D_k)
        sizes = gather_sizes(mine)
        if self.gather_with_grad:
            every = all_gather_with_grad(mine, sizes)
        else:
            start, stop = sum(sizes[:self.rank]), sum(sizes[:self.rank + 1])
            every = all_gather_no_grad(mine, sizes)
            own = _ScaleGrad.apply(mine, float(self.world_size))
            every = torch.cat([every[:start], own, every[stop:]])
        return list(every.split([f.shape[1] for f in features], dim=1)), sizes

    def global_value(self, term: torch.Tensor) -> torch.Tensor:
        """This rank's term, its value replaced by the ranks' mean (the global loss) for logs."""
        return term + (mean_over_ranks(term) - term.detach())

    def _check_process_group(self) -> None:
        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            raise RuntimeError(f"{type(self).__name__}(world_size={self.world_size}) needs a process "
                               "group of that size: call bigbatch.distributed.init_distributed() first")


class ClipLoss(_GlobalBatchLoss):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy; pair i matches i.

    Distributed modes (local_loss, gather_with_grad): see the module docstring.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        (images, texts), sizes = self.gather(image_features, text_features)  # (N, D) each
        term = self.contrastive(image_features, text_features, images, texts, sizes,
                                logit_scale, logit_bias)
        return self.global_value(term) if self.local else term

    def contrastive(self, image_features: torch.Tensor, text_features: torch.Tensor,
                    images: torch.Tensor, texts: torch.Tensor, sizes: list[int],
                    logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's term from its own (n, D) and the gathered (N, D) features: the
        global loss, or under local_loss world_size times its rows' share of it."""
        n_total = sum(sizes)
        if not self.local:
            tile = self.tile(n_total, n_total)
            if tile is not None:  # both directions from one pass over the blocks
                image_to_text, text_to_image = tiled.softmax_cross_entropy(
                    images, texts, logit_scale, logit_bias, tile=tile, symmetric=True)
                return (image_to_text.sum() + text_to_image.sum()) / (2 * n_total)
            logits = _logits(images, texts, logit_scale, logit_bias)  # (N, N)
            labels = torch.arange(n_total, device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        start, tile = sum(sizes[:self.rank]), self.tile(image_features.shape[0], n_total)
        rows = (_cross_entropy_sum(image_features, texts, start, logit_scale, logit_bias, tile)  # (n, N)
                + _cross_entropy_sum(text_features, images, start, logit_scale, logit_bias, tile))
        return rows * self.world_size / (2 * n_total)


class DistillClipLoss(ClipLoss):
    """CLIP's loss plus distillation from a frozen teacher (open_clip's DistillClipLoss):
    in each direction, the cross-entropy of the student's softmax over the batch against
    the teacher's, -sum_j p_ij log q_ij, averaged over the rows and the two directions.

    The teacher's features (`dist_image_features`, `dist_text_features`, its exp'd
    `dist_logit_scale`) are gathered with the student's, in the same collective, and
    its term couples samples like the contrastive one: taken once over the global batch,
    with the same distributed modes (module docstring). A logit bias shifts a row's logits
    alike: the distillation term does not depend on it. After each call `terms` holds
    the two parts, detached, under the peer's names (`contrastive_loss`, `distill_loss`).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, dist_image_features: torch.Tensor,
                dist_text_features: torch.Tensor, dist_logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        (images, texts, teacher_images, teacher_texts), sizes = self.gather(
            image_features, text_features, dist_image_features, dist_text_features)
        contrastive = self.contrastive(image_features, text_features, images, texts, sizes,
                                       logit_scale, logit_bias)
        n_total = sum(sizes)
        if self.local:  # this rank's rows against every column, in both directions
            start = sum(sizes[:self.rank])
            rows, tile = slice(start, start + image_features.shape[0]), self.tile(image_features.shape[0], n_total)
            distill = (_distill_sum(image_features, texts, logit_scale, teacher_images[rows], teacher_texts,
                                    dist_logit_scale, tile)
                       + _distill_sum(text_features, images, logit_scale, teacher_texts[rows], teacher_images,
                                      dist_logit_scale, tile))
            distill = distill * self.world_size / (2 * n_total)
        elif (tile := self.tile(n_total, n_total)) is not None:  # both directions, one pass
            image_to_text, text_to_image = tiled.soft_cross_entropy(
                images, texts, logit_scale, teacher_images, teacher_texts, dist_logit_scale,
                tile=tile, symmetric=True)
            distill = (image_to_text.sum() + text_to_image.sum()) / (2 * n_total)
        else:  # the text direction's logits are the image direction's, transposed
            student = _logits(images, texts, logit_scale, None)  # (N, N)
            teacher = _logits(teacher_images, teacher_texts, dist_logit_scale, None)
            distill = (_soft_cross_entropy_sum(student, teacher)
                       + _soft_cross_entropy_sum(student.T, teacher.T)) / (2 * n_total)
        terms = torch.stack([contrastive, distill])
        if self.local:
            terms = self.global_value(terms)
        self.terms = dict(zip(("contrastive_loss", "distill_loss"), terms.detach()))
        return terms.sum()


class SigLipLoss(_GlobalBatchLoss):
    """Pairwise sigmoid loss (Zhai et al. 2023): every (image, text) pair is a binary task.

    Normalised, as in the paper, by the number of images: the sum over the N x N pairs
    divided by N. Across ranks the local mode takes this rank's images against all
    texts, (n, N), and gathers only the texts; see the module docstring for the modes.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLIP needs a learnable logit_bias: use a model with "
                             "init_logit_bias set (e.g. a ViT-*-SigLIP config)")
        if not self.local:
            (images, texts), sizes = self.gather(image_features, text_features)
            tile = self.tile(sum(sizes), sum(sizes))
            return _sigmoid_pairs_sum(images, texts, 0, logit_scale, logit_bias, tile) / sum(sizes)
        (texts,), sizes = self.gather(text_features)
        start, tile = sum(sizes[:self.rank]), self.tile(image_features.shape[0], sum(sizes))
        pairs = _sigmoid_pairs_sum(image_features, texts, start, logit_scale, logit_bias, tile)
        return self.global_value(pairs * self.world_size / sum(sizes))


def _logits(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor,
            logit_bias: torch.Tensor | None) -> torch.Tensor:
    """(n, D) x (N, D) -> (n, N) float32 scaled similarities (float32 under autocast too)."""
    with tiled.no_autocast(rows.device):
        logits = logit_scale.float() * rows.float() @ columns.float().T
        return logits if logit_bias is None else logits + logit_bias.float()


def _cross_entropy_sum(rows: torch.Tensor, columns: torch.Tensor, start: int,
                       logit_scale: torch.Tensor, logit_bias: torch.Tensor | None,
                       tile: int | None) -> torch.Tensor:
    """Sum over the n rows of softmax cross-entropy against N columns; row i matches start + i."""
    if tile is not None:
        return tiled.softmax_cross_entropy(rows, columns, logit_scale, logit_bias,
                                           start=start, tile=tile).sum()
    labels = torch.arange(start, start + rows.shape[0], device=rows.device)
    return F.cross_entropy(_logits(rows, columns, logit_scale, logit_bias), labels, reduction="sum")


def _distill_sum(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor,
                 teacher_rows: torch.Tensor, teacher_columns: torch.Tensor, teacher_scale: torch.Tensor,
                 tile: int | None) -> torch.Tensor:
    """Sum over the n rows of the student's soft cross-entropy against the teacher's softmax."""
    if tile is not None:
        return tiled.soft_cross_entropy(rows, columns, logit_scale, teacher_rows, teacher_columns,
                                        teacher_scale, tile=tile).sum()
    return _soft_cross_entropy_sum(_logits(rows, columns, logit_scale, None),
                                   _logits(teacher_rows, teacher_columns, teacher_scale, None))


def _soft_cross_entropy_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -sum_j softmax(teacher)_ij log softmax(student)_ij, (n, N) logits."""
    return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum()


def _sigmoid_pairs_sum(images: torch.Tensor, texts: torch.Tensor, start: int,
                       logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                       tile: int | None) -> torch.Tensor:
    """Sum of -log sigmoid(+-logit) over the (n, N) pairs; image i matches text start + i."""
    if tile is not None:
        return tiled.sigmoid_pair_loss(images, texts, logit_scale, logit_bias,
                                       start=start, tile=tile).sum()
    logits = _logits(images, texts, logit_scale, logit_bias)
    signs = -torch.ones_like(logits)
    signs.diagonal(start).fill_(1.0)
    return -F.logsigmoid(signs * logits).sum()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class CaptionLoss(nn.Module):
    """CoCa's captioning loss: token cross-entropy of the caption logits (B, T, vocab)
    against the labels (B, T), padding ignored, times `weight`.

    Its terms do not couple samples, so `cached_backward` takes it in pass 2 only, one
    micro-batch at a time (a `SampleLoss`): the caption logits are never cached. The
    mean is over the tokens of the whole global batch, as one large batch would take it
    (open_clip_train's CoCaLoss: over each rank's micro-batch).
    """

    keys = ("logits", "labels")

    def __init__(self, weight: float = 2.0, pad_id: int = 0):
        super().__init__()
        self.weight, self.pad_id = weight, pad_id

    @classmethod
    def applies_to(cls, outputs: dict) -> bool:
        """Whether `outputs` are a captioning model's (CoCa's)."""
        return set(cls.keys) <= outputs.keys()

    def count(self, outputs: dict) -> torch.Tensor:
        return (outputs["labels"] != self.pad_id).sum()

    def forward(self, outputs: dict, total: torch.Tensor) -> torch.Tensor:
        logits, labels = outputs["logits"], outputs["labels"]  # (B, T, vocab), (B, T)
        # as (B T, vocab) rows (a view); nothing larger than the logits is kept or made
        tokens = token_cross_entropy(logits.flatten(0, 1), labels.flatten(), self.pad_id)
        return self.weight * tokens / total.clamp_min(1)


class Weighted(nn.Module):
    """A loss times a constant (CoCa's --coca-contrastive-loss-weight)."""

    def __init__(self, loss: nn.Module, weight: float):
        super().__init__()
        self.loss, self.weight = loss, weight

    def forward(self, **outputs) -> torch.Tensor:
        return self.weight * self.loss(**outputs)


def create_loss(name: str, **options) -> nn.Module:
    """`clip`, `siglip` or `distill` (CLIP's with a teacher's); options: local_loss,
    gather_with_grad, rank, world_size, tile_size."""
    losses = {"clip": ClipLoss, "siglip": SigLipLoss, "distill": DistillClipLoss}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}: choose one of {sorted(losses)}")
    return losses[name](**options)
