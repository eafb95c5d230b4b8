"""The batch every source yields, and the collate step that builds it."""

from __future__ import annotations

from collections import Counter
from typing import Callable, NamedTuple

import torch

from .samples import Sample

Tokenizer = Callable[[list[str]], torch.Tensor]


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) uint8 (the model normalises them), or float if preprocessed so
    texts: torch.Tensor  # (B, L) long token ids
    labels: torch.Tensor | None  # (B,) long class ids, -1 where a sample has none; None when none has one
    skipped: dict[str, int]  # bad samples dropped while building THIS batch, by reason (a delta)
    bad: tuple[str, ...] = ()  # the same samples, named ("shard:key: reason", "file row N: reason")


def collate(samples: list[Sample], tokenizer: Tokenizer, skipped: Counter | dict) -> Batch:
    """Stack images, tokenize all captions at once (far faster than one by one), attach skips."""
    labels = [s.label for s in samples]
    return Batch(
        images=torch.stack([s.image for s in samples]),
        texts=tokenizer([s.caption for s in samples]).long(),
        labels=None if labels.count(None) == len(labels) else torch.tensor(
            [-1 if label is None else label for label in labels], dtype=torch.long),
        skipped=dict(skipped),
    )
