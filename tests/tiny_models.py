"""Tiny models for fast CPU tests: real open_clip / timm towers at toy sizes."""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from bigbatch.model import init_caption_projection

TEXT_CFG = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=2)


def open_clip_vit(patch_dropout: float = 0.0, dropout: float = 0.0,
                  siglip: bool = False) -> nn.Module:
    """An open_clip ViT CLIP; `dropout` goes into every residual branch of both towers."""
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16,
                        mlp_ratio=2, patch_dropout=patch_dropout),
        text_cfg=TEXT_CFG,
        init_logit_bias=-10.0 if siglip else None,
        output_dict=True,
    )
    if dropout:
        towers = [model.visual.transformer, model.transformer]
        for block in (b for t in towers for b in t.resblocks):
            block.ls_1, block.ls_2 = nn.Dropout(dropout), nn.Dropout(dropout)
    return model


def open_clip_teacher() -> nn.Module:
    """A distillation teacher for `open_clip_vit`: another ViT CLIP (wider, one layer per tower,
    16 px patches, embed dim 24) reading the same 32 px images and 16-token texts; eval mode."""
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=32, patch_size=16, width=48, layers=1, head_width=16, mlp_ratio=2),
        text_cfg=dict(TEXT_CFG, width=48, heads=3, layers=1),
        output_dict=True,
    )
    with torch.no_grad():  # a trained teacher's temperature, not the initial one
        model.logit_scale.fill_(3.0)
    return model.eval()


def open_clip_coca(dropout: float = 0.0) -> nn.Module:
    """An open_clip CoCa: ViT image tower (attentional pooler), text tower, caption decoder."""
    model = open_clip.CoCa(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2,
                        attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4,
                        output_tokens=True),
        text_cfg=dict(TEXT_CFG, layers=1, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1,
                            attn_pooler_heads=2, dim_head=16, mlp_ratio=2),
    )
    init_caption_projection(model)
    if dropout:  # into every residual branch of the three transformers
        for block in (m for m in model.modules() if hasattr(m, "ls_1")):
            block.ls_1, block.ls_2 = nn.Dropout(dropout), nn.Dropout(dropout)
    return model


def timm_tower(model_name: str, **vision_cfg) -> nn.Module:
    """An open_clip CLIP whose image tower is a timm model (no pretrained weights)."""
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, timm_model_name=model_name, timm_proj="linear",
                        **vision_cfg),
        text_cfg=TEXT_CFG,
        output_dict=True,
    )


def batches(sizes: list[int], seed: int = 0, image_size: int = 32,
            context_length: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (images, token ids) micro-batches of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, image_size, image_size, generator=g),
             torch.randint(1, 1000, (n, context_length), generator=g)) for n in sizes]


def padded_batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Like `batches`, the token ids padded (0) after a random length: micro-batches then
    differ in their number of caption tokens."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for images, texts in batches(sizes, seed=seed):
        lengths = torch.randint(3, texts.shape[1], (len(texts), 1), generator=g)
        out.append((images, texts.masked_fill(torch.arange(texts.shape[1]) >= lengths, 0)))
    return out


def uint8_batches(sizes: list[int], seed: int = 0, image_size: int = 32,
                  context_length: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Like `batches`, with uint8 images as bigbatch's loaders give them."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g),
             torch.randint(1, 1000, (n, context_length), generator=g)) for n in sizes]
