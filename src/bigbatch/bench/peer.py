"""open_clip_train's accumulated step, `open_clip_train.train.train_one_epoch` itself, fed
one step's K micro-batches from an in-memory loader, with its own `open_clip.ClipLoss` and
optimizer step."""

from __future__ import annotations

import types

import torch

from bigbatch.bench.setups import PEER, Setup
from bigbatch.model import parameter_groups
from bigbatch.patch_embedding import use_conv_patch_embedding


class PeerLoader(list):
    """What train_one_epoch reads of a loader: iteration, num_batches, num_samples."""

    def __init__(self, micro_batches):
        super().__init__(micro_batches)
        self.num_batches = len(micro_batches)
        self.num_samples = sum(len(images) for images, _ in micro_batches)


class PeerData:
    def __init__(self, loader: PeerLoader):
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        pass


def peer_args(args) -> types.SimpleNamespace:
    """The fields open_clip_train.train.train_one_epoch reads (open_clip_torch 3.x)."""
    return types.SimpleNamespace(
        device=args.device, precision=args.precision, accum_freq=args.accum_freq,
        batch_size=args.batch_size, distill=False, skip_scheduler=True, horovod=False,
        grad_clip_norm=None, log_every_n_steps=10**9, world_size=1, rank=0, local_rank=0,
        wandb=False, distributed=False)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """What open_clip_train's loader yields: float32 images, normalised (CLIP's mean and std)."""
    return images.float().div(255).sub(0.45).div(0.27)


def peer_setup(model, args, batches) -> Setup:
    """open_clip_train's own train_one_epoch and ClipLoss; one call = one optimizer step."""
    import open_clip
    from open_clip_train.train import train_one_epoch  # needs pandas (its data.py imports it)

    device = torch.device(args.device)
    use_conv_patch_embedding(model)  # open_clip's own modules
    optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    loss = open_clip.ClipLoss(cache_labels=True)
    b = args.batch_size
    data = [{"train": PeerData(PeerLoader(list(zip(as_float(images).split(b), texts.split(b)))))}
            for images, texts in batches]
    pargs = peer_args(args)
    epoch = [0]

    def step(i: int) -> None:
        train_one_epoch(model, data[i % len(data)], loss, epoch[0], optimizer, scaler,
                        None, None, pargs)
        epoch[0] += 1
        # The peer zeroes at the start of its next step; zero now so that no configuration
        # carries gradients into another's measurements.
        optimizer.zero_grad(set_to_none=True)

    return Setup(PEER, f"{b} x {args.accum_freq}", model, optimizer, step,
                 extra={"call": "open_clip_train.train.train_one_epoch(model, data, open_clip.ClipLoss("
                                "cache_labels=True), epoch, AdamW, scaler, scheduler=None, dist_model=None, "
                                "args) with data['train'].dataloader = K in-memory micro-batches",
                        "args": vars(pargs)})

