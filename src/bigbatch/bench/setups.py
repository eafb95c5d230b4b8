"""The configurations side by side: one model copy, optimizer and step each, on the same data.

  plain            bigbatch at batch K*b: `cached_backward(model, [whole], ClipLoss())`,
                   i.e. K = 1, one forward + one backward; then the AdamW step.
  plain per micro  bigbatch at b without accumulation: the same K*b samples as K steps of
                   b, each one forward + one backward and an AdamW step (the memory class
                   of the accumulated step; what --accum-freq 1 at this micro-batch does).
  bigbatch accum   bigbatch at b x K: `cached_backward(model, K micro-batches, ClipLoss())`;
                   then the AdamW step.
  open_clip accum  the peer at b x K (bigbatch.bench.peer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from bigbatch.accumulation import cached_backward
from bigbatch.build import adamw  # the trainer's own optimizer and step
from bigbatch.device import autocast_factory
from bigbatch.losses import ClipLoss
from bigbatch.model import parameter_groups
from bigbatch.step import optimizer_step, unscale_and_clip

PLAIN, ACCUM, PEER = "bigbatch plain", "bigbatch accumulated", "open_clip_train accumulated"
PLAIN_MICRO = "bigbatch plain per micro-batch"


def make_batches(count: int, global_batch: int, image_size: tuple[int, int], context_length: int,
                 vocab_size: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` global batches of random uint8 images (N, 3, H, W) and token ids (N, L), made
    once: what bigbatch's loader yields (the model normalises them; the peer gets floats)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (global_batch, 3, *image_size), dtype=torch.uint8, generator=g)
        texts = torch.randint(1, vocab_size, (global_batch, context_length), generator=g)
        batches.append((images.to(device), texts.to(device)))
    return batches


def model_shapes(model: torch.nn.Module) -> tuple[tuple[int, int], int, int]:
    size = getattr(model.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return size, int(getattr(model, "context_length", 77)), int(getattr(model, "vocab_size", 49408))


@dataclass
class Setup:
    """One configuration: its own model copy and optimizer, and a step over global batch i."""
    name: str
    batch_label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]
    extra: dict = field(default_factory=dict)


def bigbatch_setup(name: str, model, args, batches, micro: bool, loss_fn=None, steps_per_micro: bool = False) -> Setup:
    """micro: the global batch as K micro-batches of b (else one); steps_per_micro: each of
    them a step of its own (plain per micro-batch) instead of one accumulated step."""
    device = torch.device(args.device)
    optimizer = adamw(parameter_groups(model, args.wd), lr=args.lr)  # the trainer's: fused
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    autocast = autocast_factory(args.precision, device)
    loss_fn = loss_fn or ClipLoss()
    b, k = args.batch_size, args.accum_freq
    inputs = [list(zip(images.split(b), texts.split(b))) if micro else [(images, texts)]
              for images, texts in batches]

    def one_step(micro_batches: list) -> None:
        cached_backward(model, micro_batches, loss_fn, autocast=autocast, grad_scaler=scaler)
        unscale_and_clip(model, optimizer, scaler, None)  # its norm: the non-finite check's
        optimizer_step(model, optimizer, scaler)

    def step(i: int) -> None:
        micro_batches = inputs[i % len(inputs)]
        for part in ([[mb] for mb in micro_batches] if steps_per_micro else [micro_batches]):
            one_step(part)

    label = f"{b} ({k} steps)" if steps_per_micro else f"{b} x {k}" if micro else f"{b * k}"
    return Setup(name, label, model, optimizer, step)

