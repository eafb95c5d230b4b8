"""The number a plan predicts, measured: the peak over one real training step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bigbatch.plan.formula import PlanOptions
from bigbatch.plan.measure import check_distillation, input_shapes, model_key


@dataclass
class _MicroBatch:
    images: torch.Tensor
    texts: torch.Tensor


def measure_peak(model_name: str, *, batch_size: int, accum_freq: int, precision: str = "fp32",
                 grad_checkpointing: bool = False, offload_inputs: bool = False, siglip: bool = False,
                 device: str = "cpu", seed: int = 0, reuse_inputs: bool = False,
                 distill_model: str | None = None, world=None) -> tuple[int, float]:
    """The peak a plan predicts, measured: bytes over one real training step (the trainer's
    inputs, engine, loss and fused AdamW step, on random uint8 images and token ids), after
    a one-micro-batch step that made the optimizer state; and that step's seconds.
    CUDA: max_memory_allocated; CPU: bigbatch.memory's meter (see step_peak_bytes).
    reuse_inputs: one host micro-batch K times (huge K: host memory and time to make them);
    the device still holds K copies. distill_model: a frozen teacher (random weights), as
    --distill-model runs it: once per micro-batch in pass 1, its term in the loss.
    world (a bigbatch.distributed.World of several ranks): this rank's share under DDP, as
    the trainer wraps it, with --local-loss --gather-with-grad; siglip: --siglip's loss and init; the measured step is DDP's
    second, where it rebuilds its buckets (the plan's "bucket rebuild" phase). On CUDA it switches on the trainer's math for the process, as training does
    (bigbatch.device.use_fast_cuda_math: TF32, cuDNN benchmark)."""
    from bigbatch.accumulation import cached_backward
    from bigbatch.build import adamw, caption_loss
    from bigbatch.device import autocast_factory, use_fast_cuda_math
    from bigbatch.distributed import wrap_model
    from bigbatch.inputs import input_bytes
    from bigbatch.losses import create_loss
    from bigbatch.memory import step_peak_bytes
    from bigbatch.model import create_model, parameter_groups, weights_precision
    from bigbatch.step import optimizer_step, step_inputs, unscale_and_clip
    from bigbatch.teacher import Teacher

    device = torch.device(device)
    if device.type == "cuda":
        use_fast_cuda_math()  # the trainer's math: TF32 in the float32 loss, cuDNN benchmark
    torch.manual_seed(seed)
    weights = dict(precision=weights_precision(precision))  # open_clip casts them
    if distill_model:
        check_distillation(PlanOptions(model_name))  # as training and the plan refuse it
    net = create_model(model_name, grad_checkpointing=grad_checkpointing, siglip=siglip, device=device,
                       tokenizer=False, **weights).model
    teacher = Teacher(create_model(distill_model, device=device, tokenizer=False,
                                   **weights).model) if distill_model else None
    optimizer = adamw(parameter_groups(net, 0.2), lr=1e-5)
    autocast = autocast_factory(precision, device)
    ranks = {}
    if world is not None and world.world_size > 1:
        net = wrap_model(net, world)
        ranks = dict(local_loss=True, gather_with_grad=True, rank=world.rank, world_size=world.world_size)
    loss_fn = create_loss("distill" if teacher else "siglip" if siglip else "clip", **ranks)
    caption = caption_loss(net)  # CoCa's, in pass 2 one micro-batch at a time, as the trainer takes it
    (height, width), context = input_shapes(model_key(model_name, False, None))
    generator = torch.Generator().manual_seed(seed)

    def micro_batch():  # as the loader gives it: uint8 images, pinned for a GPU
        images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator)
        texts = torch.randint(1, 1000, (batch_size, context), generator=generator)
        pin = device.type == "cuda"
        return _MicroBatch(images.pin_memory() if pin else images, texts.pin_memory() if pin else texts)

    def step(batches: list) -> None:
        inputs, to_device = step_inputs(batches, device, offload_inputs)
        cached_backward(net, inputs, loss_fn, autocast=autocast, to_device=to_device, teacher=teacher,
                        sample_loss=caption)
        unscale_and_clip(net, optimizer, None, clip_norm=1.0)
        optimizer_step(net, optimizer, None)

    step([micro_batch()])
    # made before the step: not in its time
    batches = [micro_batch()] * accum_freq if reuse_inputs else [micro_batch() for _ in range(accum_freq)]
    start = time.perf_counter()
    resident = (net, optimizer) + ((teacher.model,) if teacher else ())
    peak = step_peak_bytes(lambda: step(batches), *resident, device=device)
    seconds = time.perf_counter() - start
    on_host = device.type == "cpu"  # then the inputs are "on the device" all along: count them
    return peak + (input_bytes([(b.images, b.texts) for b in batches]) if on_host else 0), seconds
