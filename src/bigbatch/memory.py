"""The one meter of bytes: what a step saves for backward and holds alive, counted exactly.

Used by the planner (activations on fake tensors, its check against a real step), the
benchmark and the tests. Counting storages (not tensors), each once, with weakref
finalizers to see them freed, gives numbers that do not depend on the machine or the
allocator: on CPU the peak of live bytes is the analogue of
`torch.cuda.max_memory_allocated` over a baseline.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Box:
    """What autograd keeps instead of a saved tensor; its death frees the tensor."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class MemoryMeter(TorchDispatchMode):
    """Peak bytes saved for backward and (optionally) peak live bytes created inside `with`.

    Both count storages, each once, by address: a storage enters when the first tensor or
    saved box referring to it is registered and leaves when the last one dies (weakref
    finalizers). Storages alive before the meter started (pass `exclude`: weights,
    optimizer state, inputs) are never counted, not even through views of them.

    - saved: autograd's saved tensors, via `torch.autograd.graph.saved_tensors_hooks`. Not
      machine-dependent; what activation memory is made of.
    - live (track_live=True): every op's outputs, via this TorchDispatchMode, plus the saved
      boxes; the peak is what the allocator would have to hold at once for tensors made in
      the step (temporaries, gradients, cached features, logits), the CPU analogue of
      `torch.cuda.max_memory_allocated` over a baseline. Slow (Python per op): never timed.

    `region`, set by the caller while the meter runs (e.g. the block running now), is
    recorded with each storage when it is first counted: `saved.storages()` says where.
    """

    def __init__(self, exclude: set[int] = frozenset(), track_live: bool = True):
        super().__init__()
        self.exclude = set(exclude)
        self.track_live = track_live
        self.saved = _Tally()
        self.live = _Tally()
        self.largest_tensor_bytes = 0
        self.region: object = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        if self.track_live:
            super().__enter__()
        return self

    def __exit__(self, *exc):
        if self.track_live:
            super().__exit__(*exc)
        return self._hooks.__exit__(*exc)

    def hold(self, tensor: torch.Tensor) -> object:
        """Count `tensor` as saved for backward until the returned handle dies: what a step
        keeps for a later backward outside autograd's graph (e.g. logits awaiting their loss)."""
        return self._pack(tensor)

    def _pack(self, tensor: torch.Tensor):
        key, nbytes = storage_key(tensor)
        if key is None or key in self.exclude:
            return tensor
        box = _Box(tensor)
        self.saved.add(key, nbytes, box, self.region)
        if self.track_live:
            self.live.add(key, nbytes, box, self.region)
        return box

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Box) else packed

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key, nbytes = storage_key(t)
                if key is not None and key not in self.exclude:
                    self.live.add(key, nbytes, t, self.region)
                    self.largest_tensor_bytes = max(self.largest_tensor_bytes, nbytes)
        return out

    def result(self) -> dict:
        out = {"saved_peak_bytes": self.saved.peak}
        if self.track_live:
            out.update(live_peak_bytes=self.live.peak, largest_tensor_bytes=self.largest_tensor_bytes)
        return out


class _Tally:
    """Live storages (key -> [holders, bytes, region]) and the peak of their sum."""

    def __init__(self):
        self.entries: dict[int, list] = {}
        self.current = 0
        self.peak = 0

    def add(self, key: int, nbytes: int, holder: object, region: object = None) -> None:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = [0, nbytes, region]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(holder, self._release, key)

    def storages(self) -> dict[int, tuple[int, object]]:
        """The storages alive now: key -> (bytes, the region each was first counted in)."""
        return {key: (nbytes, region) for key, (_, nbytes, region) in self.entries.items()}

    def _release(self, key: int) -> None:
        entry = self.entries[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.entries[key]


def storage_key(tensor: torch.Tensor) -> tuple[int | None, int]:
    """(key, bytes) of the tensor's storage, the same for all its views; key None when it
    has none to count (sparse tensors, empty storages). The key is the storage's own
    address, not its data's: fake tensors (the planner's) have no data."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse: nothing to count
        return None, 0
    nbytes = storage.nbytes()
    return (storage._cdata if nbytes else None), nbytes


def storage_keys(*objects) -> set[int]:
    """Addresses of every storage reachable from tensors, modules, optimizers, nested lists."""
    keys: set[int] = set()

    def visit(obj) -> None:
        if isinstance(obj, torch.Tensor):
            key, _ = storage_key(obj)
            if key is not None:
                keys.add(key)
            if obj.grad is not None:
                visit(obj.grad)
        elif isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    visit(value)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                visit(value)
        elif obj is not None and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                if isinstance(value, (torch.Tensor, dict, list, tuple)):
                    visit(value)

    for obj in objects:
        visit(obj)
    return keys


def tensor_bytes(*objects, gradients: bool = True) -> int:
    """Bytes of the distinct storages of parameters, the gradients they hold (DDP's, views of
    its buckets, live between steps), buffers / optimizer state (for the CUDA peak)."""
    seen, total = set(), 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            params = list(obj.parameters())
            grads = [p.grad for p in params if p.grad is not None] if gradients else []
            tensors = params + grads + list(obj.buffers())
        else:
            tensors = [v for s in obj.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            key, nbytes = storage_key(t)
            if key is not None and key not in seen:
                seen.add(key)
                total += nbytes
    return total


def step_peak_bytes(step: Callable[[], object], *resident, device: torch.device) -> int:
    """Peak bytes while `step()` runs, what `resident` holds (weights, optimizer state)
    included: on CUDA the allocator's `max_memory_allocated` (everything this process has
    on the device), on CPU the bytes of `resident` plus the meter's peak of the tensors the
    step makes. The number `bigbatch plan` predicts, measured."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with MemoryMeter(storage_keys(*resident)) as meter:
        _count_gradients_while_alive(meter, resident)
        step()
    return tensor_bytes(*resident, gradients=False) + meter.live.peak


def _count_gradients_while_alive(meter: MemoryMeter, resident: tuple) -> None:
    """Resident gradients (DDP's, views of its buckets) in the meter's live bytes until they
    die: DDP frees its old buckets when it rebuilds them, mid-step. No reference kept here."""
    for module in resident:
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                if param.grad is not None:
                    key, nbytes = storage_key(param.grad)
                    if key is not None:
                        meter.live.add(key, nbytes, param.grad)
