"""Contrastive losses over a whole (global) batch: CLIP's softmax and SigLIP's sigmoid.

Both take the model's output dict as keyword arguments, so that
`loss_fn(**model(images, texts))` works and extra keys are ignored. Logits are
computed in float32 whatever the feature dtype: bf16 logits lose the small
differences between negatives that the loss lives on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy; pair i matches i."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        logits = logit_scale.float() * image_features.float() @ text_features.float().T  # (N, N)
        if logit_bias is not None:
            logits = logits + logit_bias.float()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): every (image, text) pair is a binary task.

    Normalised, as in the paper, by the number of images: the sum over the N x N pairs
    divided by N.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLIP needs a learnable logit_bias: use a model with "
                             "init_logit_bias set (e.g. a ViT-*-SigLIP config)")
        logits = logit_scale.float() * image_features.float() @ text_features.float().T
        logits = logits + logit_bias.float()  # (N, N)
        signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1  # +1 on the diagonal
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def create_loss(name: str) -> nn.Module:
    """`clip` or `siglip`."""
    losses = {"clip": ClipLoss, "siglip": SigLipLoss}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}: choose one of {sorted(losses)}")
    return losses[name]()
