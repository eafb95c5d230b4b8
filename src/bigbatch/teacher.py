"""The distillation teacher (`--distill-model`, `--distill-pretrained`): a frozen open_clip model.

It reads the student's own inputs, as in open_clip_train (the same tokens, and images
cropped to the student's size; each model normalises them with its own mean and std),
so the two must agree on image size, context length and vocabulary: checked when it is
built. It runs in eval mode without gradients, once per sample (pass 1 of
`cached_backward`), and its outputs are named as open_clip_train names them for its
`DistillClipLoss`: `dist_image_features`, `dist_text_features`, `dist_logit_scale`.

It is not part of the trained state: checkpoints leave it out, and a resumed run
builds it again from the flags.
"""

from __future__ import annotations

import re

import open_clip
import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.model import register_model_config
from bigbatch.weights import load_model, resolve_weights


class Teacher:
    """A frozen model called like the student; its outputs under `dist_` keys."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"dist_{k}": v for k, v in self.model(images, texts).items()}


def load_teacher(model: str, pretrained: str, student: nn.Module, device: torch.device,
                 **create_kwargs) -> Teacher:
    """--distill-model with --distill-pretrained's weights (a local file, or an open_clip tag
    in the local cache) on `device`, checked to read the student's inputs."""
    try:
        name = register_model_config(model)
        bundle = load_model(model, resolve_weights(pretrained, name, cache_dir=create_kwargs.get("cache_dir")),
                            device, **create_kwargs)
    except ConfigError as error:  # the loaders name the student's flags
        raise ConfigError(teacher_flags(str(error))) from None
    for what, theirs, ours in _inputs_read(bundle.model, student):
        if None not in (theirs, ours) and theirs != ours:
            raise ConfigError(f"--distill-model {model} reads {what} {theirs}, the student (--model) "
                              f"gives {ours}: the teacher reads the student's inputs, pick a teacher "
                              f"with the same image size, context length and tokenizer")
    return Teacher(bundle.model)


def _inputs_read(teacher: nn.Module, student: nn.Module) -> list[tuple[str, object, object]]:
    """(what, the teacher's, the student's) for each property of the inputs they share;
    None where a model does not say (CoCa's and custom text towers keep no vocab_size)."""
    def size(model):
        size = open_clip.get_model_preprocess_cfg(model).get("size")
        return (size, size) if isinstance(size, int) else tuple(size or ())

    return [("images of size", size(teacher), size(student)),
            ("token sequences of length", getattr(teacher, "context_length", None),
             getattr(student, "context_length", None)),
            ("a vocabulary of", getattr(teacher, "vocab_size", None), getattr(student, "vocab_size", None))]


def teacher_flags(message: str) -> str:
    """A loader's message about the student's flags, said of the teacher's."""
    return re.sub(r"(?<![\w-])--(model|pretrained)\b", r"--distill-\1", message)
