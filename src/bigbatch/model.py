"""open_clip models, their transforms and tokenizer, and the optimizer's parameter groups.

`--model` is any open_clip model name, a name of the small configs shipped here
(`bigbatch-tiny`, `bigbatch-small`: CPU-sized, for demos and tests), or a path to a
model config JSON (open_clip's format, or an `open_clip_config.json` holding
`model_cfg`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import nn

from bigbatch.config import ConfigError

PACKAGED_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(PACKAGED_CONFIGS)


@dataclass
class ModelBundle:
    model: nn.Module                 # returns open_clip's output dict
    preprocess_train: Callable       # PIL image -> (3, H, W) tensor, with augmentation
    preprocess_val: Callable
    tokenizer: Callable              # list[str] -> (n, context_length) long
    name: str                        # the open_clip config name


def create_model(model: str, *, pretrained: str | None = None, siglip: bool = False,
                 force_patch_dropout: float | None = None, grad_checkpointing: bool = False,
                 device: torch.device | str = "cpu") -> ModelBundle:
    """Build an open_clip model (random init unless `pretrained` names a local checkpoint)."""
    name = register_model_config(model)
    kwargs = {}
    if siglip:  # SigLIP's initialisation: t = 10, b = -10 (Zhai et al. 2023)
        kwargs.update(init_logit_scale=torch.log(torch.tensor(10.0)).item(), init_logit_bias=-10.0)
    try:
        net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, output_dict=True,
            force_patch_dropout=force_patch_dropout, **kwargs)
    except RuntimeError as error:
        if pretrained and "state_dict" in str(error):
            raise ConfigError(f"--pretrained {pretrained} does not fit --model {model}: "
                              f"pass the --model it was trained with") from None
        raise
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(name)
    return ModelBundle(net, preprocess_train, preprocess_val, tokenizer, name)


def register_model_config(model: str) -> str:
    """Resolve `--model` to an open_clip config name, registering a JSON file if given."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"--model {model}: no such config file")
        config = json.loads(path.read_text())
        config = config.get("model_cfg", config)  # open_clip_config.json nests it
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - config.keys()
        if missing:
            raise ConfigError(f"--model {model}: a model config needs keys {sorted(missing)}")
        registry = Path(tempfile.mkdtemp(prefix="bigbatch-models-"))
        (registry / path.name).write_text(json.dumps(config))
        open_clip.add_model_config(registry)
        return path.stem
    if model not in open_clip.list_models():
        raise ConfigError(f"unknown --model {model!r}: use a name from open_clip.list_models() "
                          f"(e.g. ViT-B-32), bigbatch-tiny, or a path to a model config JSON")
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices; spare gains, biases and the logit scale/bias (ndim < 2)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "logit_scale" in name or "logit_bias" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return getattr(model, "module", model)
