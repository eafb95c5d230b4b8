"""Images travel as uint8 and are normalised on the device, in the image tower's first op.

open_clip's transforms end in `ToTensor` + `Normalize`: float32 pixels, 4 bytes each. Here
the loader stops at uint8 (`pil_to_tensor`), so the step's cached inputs, the pinned host
buffers and every host -> device copy are a quarter of the size (32,768 images of 224 px:
4.9 GB instead of 19.7 GB). A forward pre-hook on the image tower turns uint8 into the
normalised float the tower expects, `x / (255 std) - mean / std`, on whatever device the
images are. Float inputs pass through untouched: they are already normalised (a transform
that works on float tensors after `ToTensor`, like timm's random erasing, keeps the float
path).

`DeviceCopier` moves a step's micro-batches to the device and starts copying the next one
on a side stream while the current one computes (a plain identity move on CPU). The order
may grow while the step runs (`expect`): micro-batches arrive from the loader during pass 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from bigbatch.crop import fast_crops

Transform = Callable


def uint8_transform(transform: Transform) -> tuple[Transform, tuple[float, ...] | None, tuple[float, ...] | None]:
    """open_clip's transform ending in uint8 instead of normalised float, with its mean and std.

    Only a `Compose` whose last two steps are a ToTensor and a Normalize is rewritten (its
    RandomResizedCrop drawing in one torch call: bigbatch.crop); any other transform is
    returned as it is, with (None, None): its floats reach the model.
    """
    steps = getattr(transform, "transforms", None)
    if (not isinstance(transform, T.Compose) or len(steps) < 2
            or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize)):
        return transform, None, None
    normalize = steps[-1]
    return (T.Compose([*fast_crops(steps[:-2]), _to_uint8]), tuple(map(float, normalize.mean)),
            tuple(map(float, normalize.std)))


def _to_uint8(image) -> torch.Tensor:
    """(3, H, W) uint8 from a PIL image (a tensor passes, as open_clip's MaybeToTensor)."""
    return image if isinstance(image, torch.Tensor) else pil_to_tensor(image)


def normalize_on_device(tower: nn.Module, mean: Sequence[float], std: Sequence[float]):
    """Make `tower` accept uint8 images: normalise them in its first op. Returns the hook handle."""
    scale = torch.tensor([1 / (255 * s) for s in std]).view(-1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    cache: dict = {}  # device -> float32 scale, shift there: no host->device copy per call

    def constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in cache:
            cache[device] = (scale.to(device), shift.to(device))
        return cache[device]

    # filled now for the tower's device: a first call under torch.compile that filled it
    # would leave a guard ("not in the cache") that fails on the next call, a recompile
    constants(_device(tower))

    def normalize(module: nn.Module, args: tuple):
        images = args[0] if args else None
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            return None
        s, b = constants(images.device)
        return (torch.addcmul(b, images.to(torch.float32), s).to(_float_dtype(module)), *args[1:])

    return tower.register_forward_pre_hook(normalize)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the tower's first convolution, which reads the images: float32 under
    autocast, bf16/fp16 where the weights are cast (pure_bf16, or open_clip's bf16, which
    casts the convolutions and linear layers only); without one, its first float parameter."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.weight.is_floating_point():
            return m.weight.dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def input_bytes(micro_batches: Sequence[Sequence]) -> int:
    """Bytes of every tensor in the step's inputs (what a step caches or copies)."""
    return sum(t.numel() * t.element_size() for mb in micro_batches for t in mb
               if isinstance(t, torch.Tensor))


class DeviceCopier:
    """`copier(inputs)` returns `inputs` on `device`. On CUDA, when the calls follow `order`
    (the micro-batches, the same objects, in the order they will be asked for), it then
    starts copying the next one on a side stream, so that copy overlaps this one's compute.

    Any other call is a plain copy. At most two micro-batches are on the device through it
    at a time: the one computing and the next. `expect` appends to `order`: a micro-batch
    known before the forward of the one ahead of it is still prefetched.
    """

    def __init__(self, device: torch.device, order: Sequence[Sequence] = ()):
        self.device = device
        self.order, self.cursor = list(order), 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict[int, tuple] = {}  # id(inputs) -> (its device copy, copy-done event)

    def __call__(self, inputs: Sequence) -> tuple:
        copy = self._take(inputs)
        if self.cursor < len(self.order) and self.order[self.cursor] is inputs:
            self.cursor += 1
            if self.stream is not None and self.cursor < len(self.order):
                self._prefetch(self.order[self.cursor])
        return copy

    def expect(self, *inputs: Sequence) -> None:
        """These micro-batches will be asked for next, after those already in `order`."""
        self.order.extend(inputs)

    def _copy(self, inputs: Sequence) -> tuple:
        return tuple(None if t is None else t.to(self.device, non_blocking=True) for t in inputs)

    def _take(self, inputs: Sequence) -> tuple:
        if id(inputs) not in self.pending:
            return self._copy(inputs)
        copy, done = self.pending.pop(id(inputs))
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for t in copy:  # made on the side stream, used on this one: keep its memory for it
            if t is not None:
                t.record_stream(current)
        return copy

    def _prefetch(self, inputs: Sequence) -> None:
        if id(inputs) in self.pending:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # its buffers are free
        with torch.cuda.stream(self.stream):
            copy = self._copy(inputs)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[id(inputs)] = (copy, done)
