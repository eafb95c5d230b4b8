"""Token cross-entropy that keeps nothing larger than the logits.

CoCa's caption loss reads logits (B T, vocab): 480 M numbers for coca_ViT-B-32 at a
micro-batch of 128. `F.cross_entropy` on them, under autocast, saves the float32 log-probs
(4 bytes a number), and its backward holds two more float32 tensors of that size at once
(the log-probs' gradient, then the logits'): 12 bytes a number, 5.8 GB there.

`token_cross_entropy` takes the same sum in float32, a chunk of rows at a time, and saves
the logits themselves (already alive: the model made them) with one float32 log-sum-exp
per row. Its backward writes softmax - one-hot straight into the logits' gradient, in the
logits' dtype, chunk by chunk: the gradient (2 bytes a number in bf16) plus one float32
chunk. Same value and gradient as `F.cross_entropy(..., reduction="sum")` up to float32
rounding (tests/test_losses.py).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.autograd.function import once_differentiable

CHUNK_NUMBERS = 1 << 24  # float32 numbers a chunk of rows may hold (64 MiB)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum over the rows of `logits` (N, vocab) whose label (N,) is not `ignore_index` of
    -log softmax(row)[label], in float32."""
    return _TokenCrossEntropy.apply(logits, labels, ignore_index)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: about CHUNK_NUMBERS float32 numbers, at least one row."""
    return max(1, CHUNK_NUMBERS // vocab)


def _chunks(logits: torch.Tensor) -> Iterator[slice]:
    step = chunk_rows(logits.shape[1])
    return (slice(start, start + step) for start in range(0, logits.shape[0], step))


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        kept = labels != ignore_index
        targets = labels.masked_fill(~kept, 0).unsqueeze(1)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in _chunks(logits):
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, dim=1)
            picked = chunk.gather(1, targets[rows]).squeeze(1)
            del chunk  # before the next one is made
            total += ((lse[rows] - picked) * kept[rows]).sum()
        ctx.save_for_backward(logits, targets, kept, lse)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, kept, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _chunks(logits):
            # softmax, in float32 (promoted by lse), in one new chunk: never the logits in place
            chunk = torch.sub(logits[rows], lse[rows].unsqueeze(1)).exp_()
            chunk.scatter_add_(1, targets[rows], torch.full_like(targets[rows], -1, dtype=chunk.dtype))
            chunk *= (grad_total * kept[rows]).unsqueeze(1)  # padding: no gradient
            grad[rows] = chunk
            del chunk  # before the next one is made
        return grad, None, None
