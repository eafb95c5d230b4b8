"""Contrastive losses in tiles: the global-batch loss without an (N, N) logits matrix.

A plain CLIP loss over N samples materialises the (N, N) float32 logits, and autograd
keeps two (N, N) log-softmax outputs for backward: 1 GiB each at N = 16384, 16 GiB at
N = 65536. Here rows (n, D) are compared with columns (N, D) in (tile, tile) blocks:

1. Forward. For each block of rows, stream over the column blocks: logits
   L = scale * R @ C.T + bias, (tile, tile) float32, folded into a running per-row
   log-sum-exp (torch.logaddexp of the running value and the block's); in the
   symmetric case the per-column log-sum-exp is folded in from the same block. The
   positive logits are read off the block's diagonal. Only the inputs, the scalars and
   the per-row (and per-column) log-sum-exp, (n,) and (N,), are saved for backward.
2. Backward. Each block's logits are recomputed and turned, in place, into
   dL/dlogits = g_row * (softmax - target) (+ the column direction's term); the block
   then adds s * P @ C to d(rows), s * P.T @ R to d(columns), sum(P * R @ C.T) to
   d(scale) and sum(P) to d(bias). Gradients accumulate in float32, (n, D) and (N, D).

Working set: O((n + N) * D) for the float32 gradient accumulators, plus a few
(tile, tile) float32 blocks: never quadratic in N (`loss_working_set_bytes`). The cost
is one more pass of matmuls than the plain loss (the backward's recompute).

Features of any dtype (bf16, fp16) are upcast one block at a time and the logits are
float32, as in the plain loss; autocast is switched off inside, and the gradients come
back in the inputs' dtypes. Row i's positive is column `start + i`: the whole batch has
start = 0; under --local-loss a rank's rows start at its first sample's global index.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DEFAULT_TILE = 4096  # a (4096, 4096) float32 block is 64 MiB; at most 2 are alive
PLAIN_MAX_LOGITS = 8192 * 8192  # up to 256 MiB of float32 logits, the plain loss is cheaper

FLOAT32 = 4  # bytes


def choose_tile(n_rows: int, n_cols: int, tile_size: int | None = None) -> int | None:
    """The block size an (n_rows, n_cols) loss runs with; None: the plain matmul.

    tile_size None tiles only when the plain logits would pass PLAIN_MAX_LOGITS
    (N > 8192 for the whole batch), in DEFAULT_TILE blocks; an int always tiles.
    """
    if tile_size is not None:
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1 (or None: tile large batches), got {tile_size}")
        return tile_size
    return DEFAULT_TILE if n_rows * n_cols > PLAIN_MAX_LOGITS else None


def softmax_cross_entropy(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor,
                          logit_bias: torch.Tensor | None = None, *, start: int = 0,
                          tile: int = DEFAULT_TILE, symmetric: bool = False):
    """Per-row cross-entropy of softmax over columns, row i's target being column start + i.

    rows (n, D), columns (N, D) -> (n,) float32, the same as
    `F.cross_entropy(scale * rows @ columns.T + bias, start + arange(n), reduction="none")`.
    symmetric=True (square case: n == N, start == 0) returns (row_ce, column_ce), the
    second being the cross-entropy of each column over the rows (CLIP's text->image
    direction), both from one pass over the blocks.
    """
    _check(rows, columns, start, tile)
    if symmetric and (rows.shape[0] != columns.shape[0] or start != 0):
        raise ValueError("symmetric needs as many rows as columns and start=0")
    with no_autocast(rows.device):
        row_ce, column_ce = _SoftmaxCrossEntropy.apply(rows, columns, logit_scale, logit_bias,
                                                       start, tile, symmetric)
    return (row_ce, column_ce) if symmetric else row_ce


def sigmoid_pair_loss(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor | None, *, start: int = 0,
                      tile: int = DEFAULT_TILE) -> torch.Tensor:
    """SigLIP's pairwise terms summed per row: -log sigmoid(sign * logit), (n,) float32.

    sign is +1 for the pair (i, start + i) and -1 for every other pair.
    """
    _check(rows, columns, start, tile)
    with no_autocast(rows.device):
        return _SigmoidPairs.apply(rows, columns, logit_scale, logit_bias, start, tile)


def soft_cross_entropy(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor,
                       teacher_rows: torch.Tensor, teacher_columns: torch.Tensor,
                       teacher_scale: torch.Tensor, *, tile: int = DEFAULT_TILE, symmetric: bool = False):
    """Distillation's per-row soft cross-entropy, -sum_j p_ij log q_ij, where q is the
    softmax over columns of the student's logits scale * rows @ columns.T and p the
    teacher's (its features and scale are constants: they get no gradient).

    -> (n,) float32; symmetric=True (n == N) also returns the columns' (N,) terms (the
    text->image direction: softmax over the rows). With lse the log-sum-exp of a row,
    -sum_j p_ij log q_ij = lse(S_i) - sum_j p_ij S_ij: the forward streams over the blocks
    twice (the log-sum-exps, then the p-weighted logits), the backward once more with
    dL/dS_ij = g_i (q_ij - p_ij) (+ the column direction's term).
    """
    _check(rows, columns, 0, tile)
    if symmetric and rows.shape[0] != columns.shape[0]:
        raise ValueError("symmetric needs as many rows as columns")
    with no_autocast(rows.device):
        row_ce, column_ce = _SoftCrossEntropy.apply(rows, columns, logit_scale, teacher_rows.detach(),
                                                    teacher_columns.detach(), teacher_scale.detach(),
                                                    tile, symmetric)
    return (row_ce, column_ce) if symmetric else row_ce


def loss_working_set_bytes(n_rows: int, n_cols: int, dim: int, tile: int | None = DEFAULT_TILE,
                           tiled: bool = True, loss: str = "clip", teacher_dim: int | None = None) -> int:
    """Estimated peak bytes the loss allocates beyond its input features, float32 features.

    n_rows: rows this rank computes, n (N for the whole-batch loss, its own samples under
    --local-loss); n_cols: the global batch N; dim: the feature width D. Everything alive
    at the loss's peak counts, the feature gradients it produces included. With
    a = n * N, G = (n + N) * D (one direction's gradients), local = n < N (CLIP then
    takes two directions, image rows and text rows, one after the other), in float32
    elements:

    plain (the (n, N) logits matrix; peak in backward, before the feature gradients):
        clip    4 a + n D (x2 local)   two saved log-softmax outputs, nll and log-softmax
                                       grads; the scaled rows the matmul saved
        siglip  5 a + n D              logits, signs, signed logits, log-sigmoid output
                                       and buffer; the scaled rows
    tiled, in blocks B = min(tile, n) * min(tile, N), h = min(tile, n) rows:
        clip    2 B + G + h D          backward: the block, its column-softmax copy, the
                                       float32 gradients, one row block's P @ C
        clip, local   max(2 B, B + 2 G + h D)   one direction's gradients wait for the other
        siglip  max(2 B, B + G + h D)  forward: the block and its softplus
        distill max(2.5 G, 5 B + 0.5 G + G_t + h D)   the contrastive term's and the
                                       teacher's blocks, both terms' gradients and the
                                       teacher's scaled features, G_t = (n + N) D_t
    and plain distill: clip's + max(5 a + n D, G_t) (the student's logits again, the
    teacher's, both softmaxes and log-softmaxes; or, for a wide teacher, its scaled
    features). Fitted to measurements within -11%/+8% (n = N of 256 to 1,024, D 32 to 128,
    the teacher's D_t 32 to 4,096; --local-loss's rows assumed alike, not measured); the
    teacher's features are inputs, not counted here.
    The tiled estimate is flat in N but for G, O((n + N) D). bf16/fp16 features add
    their float32 upcasts and the gradients' casts back, O((n + N) D) more.
    """
    if loss not in ("clip", "siglip", "distill"):
        raise ValueError(f"unknown loss {loss!r}: clip, siglip or distill")
    n, N, D = n_rows, n_cols, dim
    local = n < N
    teacher_grads = (n + N) * (teacher_dim or dim)
    if not tiled:
        if loss == "siglip":
            return FLOAT32 * (5 * n * N + n * D)
        clip = FLOAT32 * (4 * n * N + n * D * (2 if local else 1))
        return clip + (FLOAT32 * max(5 * n * N + n * D, teacher_grads) if loss == "distill" else 0)
    if tile is None or tile < 1:
        raise ValueError("a tiled working set needs a tile size >= 1")
    h, w = min(tile, n), min(tile, N)
    block, grads = h * w, (n + N) * D
    if loss == "siglip":
        return FLOAT32 * max(2 * block, block + grads + h * D)
    if loss == "distill":
        return int(FLOAT32 * max(2.5 * grads, 5 * block + 0.5 * grads + teacher_grads + h * D))
    if local:
        return FLOAT32 * max(2 * block, block + 2 * grads + h * D)
    return FLOAT32 * (2 * block + grads + h * D)


# --- the autograd Functions

class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, columns, logit_scale, logit_bias, start, tile, symmetric):
        n, N = rows.shape[0], columns.shape[0]
        s, b = _scalars(logit_scale, logit_bias)
        row_lse = rows.new_full((n,), -float("inf"), dtype=torch.float32)
        column_lse = rows.new_full((N if symmetric else 0,), -float("inf"), dtype=torch.float32)
        positive = rows.new_zeros((n,), dtype=torch.float32)  # logit of (i, start + i)
        for i0, i1 in _spans(n, tile):
            r = rows[i0:i1].float()  # (h, D)
            for j0, j1 in _spans(N, tile):
                logits = _block(r, columns[j0:j1], s, b)  # (h, w) float32
                torch.logaddexp(row_lse[i0:i1], logits.logsumexp(1), out=row_lse[i0:i1])
                if symmetric:
                    torch.logaddexp(column_lse[j0:j1], logits.logsumexp(0), out=column_lse[j0:j1])
                k, a0, a1 = _diagonal(i0, i1, j0, j1, start)
                if a1 > a0:
                    positive[i0 + a0:i0 + a1] = logits.diagonal(k)
                del logits
        ctx.save_for_backward(rows, columns, logit_scale, logit_bias, row_lse, column_lse)
        ctx.start, ctx.tile, ctx.symmetric = start, tile, symmetric
        if not symmetric:
            ctx.mark_non_differentiable(column_lse)  # an empty placeholder
        # symmetric: start == 0 and n == N, so column j's positive is row j's.
        column_ce = column_lse - positive if symmetric else column_lse
        return row_lse - positive, column_ce

    @staticmethod
    @once_differentiable
    def backward(ctx, row_grad, column_grad):
        rows, columns, logit_scale, logit_bias, row_lse, column_lse = ctx.saved_tensors
        start, symmetric = ctx.start, ctx.symmetric
        row_grad = _grad_or_zeros(row_grad, row_lse)
        column_grad = _grad_or_zeros(column_grad, column_lse) if symmetric else None

        def block_grad(logits, i0, i1, j0, j1):
            """The block's logits -> dL/dlogits, in place: g * (softmax - target)."""
            if symmetric:  # the text->image direction: softmax over this column's rows
                by_column = (logits - column_lse[None, j0:j1]).exp_().mul_(column_grad[None, j0:j1])
            grad = logits.sub_(row_lse[i0:i1, None]).exp_().mul_(row_grad[i0:i1, None])
            k, a0, a1 = _diagonal(i0, i1, j0, j1, start)
            if a1 > a0:
                target = row_grad[i0 + a0:i0 + a1]
                if symmetric:
                    target = target + column_grad[start + i0 + a0:start + i0 + a1]
                grad.diagonal(k).sub_(target)
            if symmetric:
                grad.add_(by_column)
            return grad

        with no_autocast(rows.device):
            return _backward_blocks(ctx, rows, columns, logit_scale, logit_bias, block_grad) + (None,) * 3


class _SigmoidPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, columns, logit_scale, logit_bias, start, tile):
        n, N = rows.shape[0], columns.shape[0]
        s, b = _scalars(logit_scale, logit_bias)
        per_row = rows.new_zeros((n,), dtype=torch.float32)
        for i0, i1 in _spans(n, tile):
            r = rows[i0:i1].float()
            for j0, j1 in _spans(N, tile):
                # -log sigmoid(sign * x) = softplus(-sign * x): x for negatives, -x for positives
                logits = _block(r, columns[j0:j1], s, b)
                k, a0, a1 = _diagonal(i0, i1, j0, j1, start)
                if a1 > a0:
                    logits.diagonal(k).neg_()
                per_row[i0:i1] += F.softplus(logits).sum(1)
                del logits
        ctx.save_for_backward(rows, columns, logit_scale, logit_bias)
        ctx.start, ctx.tile = start, tile
        return per_row

    @staticmethod
    @once_differentiable
    def backward(ctx, row_grad):
        rows, columns, logit_scale, logit_bias = ctx.saved_tensors
        start, row_grad = ctx.start, row_grad.float()

        def block_grad(logits, i0, i1, j0, j1):
            """d softplus(-sign x)/dx = -sign * sigmoid(-sign x), times the row's grad."""
            k, a0, a1 = _diagonal(i0, i1, j0, j1, start)
            if a1 > a0:
                logits.diagonal(k).neg_()
            grad = logits.sigmoid_()
            if a1 > a0:
                grad.diagonal(k).neg_()
            return grad.mul_(row_grad[i0:i1, None])

        with no_autocast(rows.device):
            return _backward_blocks(ctx, rows, columns, logit_scale, logit_bias, block_grad) + (None,) * 2


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, columns, logit_scale, teacher_rows, teacher_columns, teacher_scale, tile, symmetric):
        n, N = rows.shape[0], columns.shape[0]
        s, t = _scalars(logit_scale, None)[0], _scalars(teacher_scale, None)[0]

        def blocks():
            for i0, i1 in _spans(n, tile):
                r, tr = rows[i0:i1].float(), teacher_rows[i0:i1].float()
                for j0, j1 in _spans(N, tile):
                    yield i0, i1, j0, j1, _block(r, columns[j0:j1], s, None), _block(tr, teacher_columns[j0:j1], t, None)

        # row k of each: the student's (0) and the teacher's (1) log-sum-exps
        row_lse = rows.new_full((2, n), -float("inf"), dtype=torch.float32)
        column_lse = rows.new_full((2, N if symmetric else 0), -float("inf"), dtype=torch.float32)
        for i0, i1, j0, j1, student, teacher in blocks():
            for k, logits in enumerate((student, teacher)):
                torch.logaddexp(row_lse[k, i0:i1], logits.logsumexp(1), out=row_lse[k, i0:i1])
                if symmetric:
                    torch.logaddexp(column_lse[k, j0:j1], logits.logsumexp(0), out=column_lse[k, j0:j1])
        row_dot = rows.new_zeros((n,), dtype=torch.float32)  # sum_j p_ij S_ij
        column_dot = rows.new_zeros((N if symmetric else 0,), dtype=torch.float32)
        for i0, i1, j0, j1, student, teacher in blocks():
            row_dot[i0:i1] += ((teacher - row_lse[1, i0:i1, None]).exp_() * student).sum(1)
            if symmetric:
                column_dot[j0:j1] += ((teacher - column_lse[1, None, j0:j1]).exp_() * student).sum(0)
        ctx.save_for_backward(rows, columns, logit_scale, teacher_rows, teacher_columns, teacher_scale,
                              row_lse, column_lse)
        ctx.tile, ctx.symmetric = tile, symmetric
        return row_lse[0] - row_dot, column_lse[0] - column_dot

    @staticmethod
    @once_differentiable
    def backward(ctx, row_grad, column_grad):
        rows, columns, logit_scale, teacher_rows, teacher_columns, teacher_scale, row_lse, column_lse = ctx.saved_tensors
        t, symmetric = _scalars(teacher_scale, None)[0], ctx.symmetric
        row_grad = _grad_or_zeros(row_grad, row_lse[0])
        column_grad = _grad_or_zeros(column_grad, column_lse[0]) if symmetric else None

        def block_grad(student, i0, i1, j0, j1):
            """g_i (q_ij - p_ij), + g_j (q'_ij - p'_ij) over the column's rows."""
            teacher = _block(teacher_rows[i0:i1].float(), teacher_columns[j0:j1], t, None)
            grad = (student - row_lse[0, i0:i1, None]).exp()
            grad.sub_((teacher - row_lse[1, i0:i1, None]).exp_()).mul_(row_grad[i0:i1, None])
            if symmetric:
                by_column = (student.sub_(column_lse[0, None, j0:j1])).exp_()
                by_column.sub_(teacher.sub_(column_lse[1, None, j0:j1]).exp_())
                grad.add_(by_column.mul_(column_grad[None, j0:j1]))
            return grad

        with no_autocast(rows.device):
            d_rows, d_columns, d_scale, _ = _backward_blocks(ctx, rows, columns, logit_scale, None, block_grad)
        return d_rows, d_columns, d_scale, None, None, None, None, None


def _backward_blocks(ctx, rows, columns, logit_scale, logit_bias, block_grad) -> tuple:
    """Recompute every block, turn it into dL/dlogits (P) and accumulate the gradients.

    With logits = s * R @ C.T + b: dR = s * P @ C, dC = s * P.T @ R,
    ds = sum(P * R @ C.T) = sum(R * (P @ C)) (an (h, D) product, not (h, w)), db = sum(P).
    """
    need_rows, need_columns, need_scale, need_bias = ctx.needs_input_grad[:4]
    n, N = rows.shape[0], columns.shape[0]
    s, b = _scalars(logit_scale, logit_bias)
    d_rows = rows.new_zeros(rows.shape, dtype=torch.float32) if need_rows else None
    d_columns = columns.new_zeros(columns.shape, dtype=torch.float32) if need_columns else None
    d_scale = rows.new_zeros((), dtype=torch.float32)
    d_bias = rows.new_zeros((), dtype=torch.float32)
    for i0, i1 in _spans(n, ctx.tile):
        r = rows[i0:i1].float()
        p_c = r.new_zeros(r.shape) if (need_rows or need_scale) else None  # sum_j P @ C, (h, D)
        for j0, j1 in _spans(N, ctx.tile):
            c = columns[j0:j1].float()
            grad = block_grad(_block(r, c, s, b), i0, i1, j0, j1)  # (h, w)
            if p_c is not None:
                p_c.addmm_(grad, c)
            if need_columns:
                d_columns[j0:j1].addmm_(grad.T, r)  # times s below, once
            if need_bias:
                d_bias += grad.sum()
            del grad
        if need_scale:
            d_scale += (p_c * r).sum()
        if need_rows:
            d_rows[i0:i1] = p_c.mul_(s)
    if need_columns:
        d_columns.mul_(s)
    return (d_rows.to(rows.dtype) if need_rows else None,
            d_columns.to(columns.dtype) if need_columns else None,
            d_scale.reshape(logit_scale.shape).to(logit_scale.dtype) if need_scale else None,
            d_bias.reshape(logit_bias.shape).to(logit_bias.dtype) if need_bias else None)


# --- helpers

def _check(rows: torch.Tensor, columns: torch.Tensor, start: int, tile: int) -> None:
    if rows.ndim != 2 or columns.ndim != 2 or rows.shape[1] != columns.shape[1]:
        raise ValueError(f"rows (n, D) and columns (N, D) expected, got {tuple(rows.shape)} "
                         f"and {tuple(columns.shape)}")
    if not 0 <= start <= columns.shape[0] - rows.shape[0]:
        raise ValueError(f"rows' positives start + i (start={start}, n={rows.shape[0]}) must be "
                         f"among the {columns.shape[0]} columns")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")


def _spans(total: int, tile: int) -> list[tuple[int, int]]:
    """[0, total) in pieces of `tile`, the last one ragged."""
    return [(i, min(i + tile, total)) for i in range(0, total, tile)]


def _diagonal(i0: int, i1: int, j0: int, j1: int, start: int) -> tuple[int, int, int]:
    """Where the positives (i, start + i) lie in the block rows [i0, i1) x columns [j0, j1).

    They are the block's diagonal k = start + i0 - j0 (block-local (a, a + k)), which
    covers the block rows [a0, a1); empty when a1 <= a0.
    """
    k = start + i0 - j0
    return k, max(0, -k), min(i1 - i0, j1 - j0 - k)


def _scalars(logit_scale: torch.Tensor, logit_bias: torch.Tensor | None):
    """0-dim float32 copies (a (1,) parameter under FSDP2 broadcasts the same)."""
    s = logit_scale.detach().float().reshape(())
    b = None if logit_bias is None else logit_bias.detach().float().reshape(())
    return s, b


def _block(r: torch.Tensor, columns: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None):
    """(h, D) float32 rows x (w, D) columns -> (h, w) float32 logits."""
    logits = (r @ columns.float().T).mul_(s)
    return logits if b is None else logits.add_(b)


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.float()


def no_autocast(device: torch.device):
    """Float32 math even inside the training step's autocast region."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()
