"""Process groups from torchrun or SLURM, and all-gathers that carry gradients.

Launch one process per GPU with `torchrun --nproc-per-node G -m bigbatch train ...` or
with `srun` (one task per GPU); `init_distributed()` reads the launcher's variables and
joins the process group. Without them it is one process and no process group.

Gathers concatenate along dim 0 in rank order. Every rank must call them at the same
point with tensors of the same trailing shape and dtype; the first dimension may differ
(the smaller last step of an epoch): row counts are gathered first (one tiny collective
and a host sync) and rows are padded to the largest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bigbatch.device import pick_device

# newer torch renames the single-tensor collectives (the old names warn); 2.4 has only those
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class World:
    """This process's place among the ranks, and the device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and saves checkpoints."""
        return self.rank == 0


@dataclass(frozen=True)
class Launch:
    """What the launcher's environment says; master_* is where rank 0 listens."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: str | None = None


def world_from_env(env: Mapping[str, str]) -> Launch:
    """Parse torchrun's or SLURM's variables (torchrun's win: it may run inside srun).

    torchrun: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
    SLURM (`srun`, one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS. Unless
    MASTER_ADDR is exported, rank 0's host is the first one of SLURM_NODELIST (srun's
    default block distribution puts task 0 there; only the `prefix[a-b,c]` form is
    parsed), else SLURM_LAUNCH_NODE_IPADDR. MASTER_PORT defaults to 29500 plus
    SLURM_JOB_ID mod 1000, so that jobs sharing a node do not collide.
    Neither: one process.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                      env.get("MASTER_ADDR"), env.get("MASTER_PORT"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = (env.get("MASTER_ADDR") or _first_host(env.get("SLURM_NODELIST", ""))
                or env.get("SLURM_LAUNCH_NODE_IPADDR"))
        port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", 0)) % 1000)
        return Launch(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                      int(env["SLURM_NTASKS"]), addr, port)
    return Launch()


def _first_host(nodelist: str) -> str | None:
    """'gpu[03-05,09],cpu1' -> 'gpu03'; 'a1,a2' -> 'a1'."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
    return match and match[1] + (match[2] or "")


def init_distributed(device: str = "auto", backend: str | None = None, *, init_method: str | None = None,
                     set_device_rank: bool = True) -> World:
    """Join the process group the launcher set up (none for one process).

    device: "auto" (CUDA if visible, else CPU), "cpu", "cuda" (this rank's
    `cuda:{local_rank}`) or an explicit "cuda:N". backend: nccl on CUDA, gloo otherwise.
    init_method: the process group's rendezvous (default env://). set_device_rank=False:
    "cuda" is cuda:0 on every rank (each process sees only its own GPU).
    """
    launch = world_from_env(os.environ)
    world = World(launch.rank, launch.local_rank, launch.world_size,
                  pick_device(device, launch.local_rank if set_device_rank else 0))
    if world.world_size == 1:
        return world
    if not (launch.master_addr and launch.master_port):
        raise ValueError("a multi-process launch needs MASTER_ADDR and MASTER_PORT: start with "
                         "torchrun (it sets them) or export both")
    if backend == "nccl" and world.device.type != "cuda":
        raise ValueError("--dist-backend nccl runs on GPUs: use gloo (the default on CPU)")
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    # env:// so that torchrun's agent store is reused rather than bound twice
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", launch.master_port)
    dist.init_process_group(
        backend or ("nccl" if world.device.type == "cuda" else "gloo"),
        rank=world.rank, world_size=world.world_size, init_method=init_method,
        device_id=world.device if world.device.type == "cuda" else None)
    return world


def cleanup() -> None:
    """Leave the process group, if any (call at exit on every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_sizes(t: torch.Tensor) -> list[int]:
    """Every rank's `t.shape[0]`, in rank order."""
    if _world_size() == 1:
        return [t.shape[0]]
    sizes = torch.empty(_world_size(), dtype=torch.long, device=t.device)
    _all_gather_single(sizes, torch.tensor([t.shape[0]], device=t.device))
    return sizes.tolist()  # a host sync, once per gather


def all_gather_no_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """(n_rank, ...) on each rank -> (sum of n_rank, ...), rank-major; no autograd.

    sizes: every rank's row count if already known (saves a collective).
    """
    if _world_size() == 1:
        return t
    sizes = sizes or gather_sizes(t)
    rows = max(sizes)
    out = t.new_empty((len(sizes) * rows, *t.shape[1:]))
    _all_gather_single(out, _pad_rows(t.detach(), rows).contiguous())
    if min(sizes) == rows:
        return out
    return torch.cat([chunk[:n] for chunk, n in zip(out.split(rows), sizes)])


def all_gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """As `all_gather_no_grad`, differentiable.

    Every rank back-propagates its own loss into ALL gathered rows; the gradient of this
    rank's rows is the sum of those over ranks (a reduce-scatter), as it must be when
    each rank's loss depends on every rank's features.
    """
    if _world_size() == 1:
        return t
    return _AllGather.apply(t, sizes or gather_sizes(t))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return all_gather_no_grad(t, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rows = ctx.sizes, max(ctx.sizes)
        padded = torch.cat([_pad_rows(g, rows) for g in grad.split(sizes)])  # (W * rows, ...)
        mine = grad.new_empty((rows, *grad.shape[1:]))
        _reduce_scatter_single(mine, padded.contiguous())  # sum over ranks, own rows kept
        return mine[:sizes[dist.get_rank()]], None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to `rows`; F.pad's spec lists the last dimension first."""
    if t.shape[0] == rows:
        return t
    return F.pad(t, (0, 0) * (t.ndim - 1) + (0, rows - t.shape[0]))


# --- wrapping and whole-model state, the same calls for one process, DDP and FSDP2

def wrap_model(model: torch.nn.Module, world: World, fsdp: bool = False,
               static_graph: bool = False) -> torch.nn.Module:
    """DDP (replicated weights) or FSDP2 (sharded weights, grads, optimizer state).

    One process: the model itself. FSDP2 shards each transformer block, then the rest.
    """
    if world.world_size == 1 and not fsdp:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from bigbatch.model import transformer_blocks  # the units FSDP2 gathers one at a time
        _scalars_to_vectors(model)
        for block in transformer_blocks(model):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    ids = [world.device.index] if world.device.type == "cuda" else None
    # gradients as views into the all-reduce buckets: made before DDP, which adopts them, and
    # zeroed between steps, never dropped (keeps_gradients): one copy of the gradients in every
    # phase. Dropped, every step's unsynchronised backwards would make a second beside the buckets.
    # Not with a static graph (K = 1 only: no unsynchronised backward), which leaves the
    # gradient of a parameter no rank used untouched: None, for AdamW to skip, not a zero to decay.
    if not static_graph:
        for param in model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                   static_graph=static_graph)


def keeps_gradients(model: torch.nn.Module) -> bool:
    """Whether a step zeroes .grad rather than dropping it: DDP's are views of its buckets
    (wrap_model)."""
    from torch.nn.parallel import DistributedDataParallel
    return isinstance(model, DistributedDataParallel) and not model.static_graph


def _scalars_to_vectors(model: torch.nn.Module) -> None:
    """fully_shard refuses 0-dim parameters: logit_scale/logit_bias become shape (1,).
    open_clip's loader reshapes them back when it reads a checkpoint."""
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if isinstance(param, torch.nn.Parameter) and param.ndim == 0:
            setattr(model, name, torch.nn.Parameter(param.detach().reshape(1)))


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded, unwrapped model and optimizer state on CPU (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    made = _make_optimizer_state(optimizer)  # saved before any step was applied: still every parameter's
    try:
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))
    finally:
        if made:  # as it was: the first real step makes its own (AdamW counts its steps)
            optimizer.state.clear()


def load_full_model_state(model: torch.nn.Module, model_state: dict) -> None:
    """The inverse of `full_state` for the weights: every rank loads the same full state
    (canonical names and shapes: bigbatch.checkpoint.canonical_weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not any(isinstance(v, torch.Tensor) for state in optimizer_state.get("state", {}).values()
               for v in state.values()):
        # a stateless optimizer (SGD without momentum): torch's loader finds no tensor to
        # place and refuses; there are only the groups' hyperparameters to restore
        for group, saved in zip(optimizer.param_groups, optimizer_state["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    _make_optimizer_state(optimizer)
    set_optimizer_state_dict(model, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True))


def _make_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """The state torch's state-dict functions read: they make it themselves (a step at lr 0
    on zero gradients) only where no gradient exists yet, and DDP's kept gradients (zeros)
    do. Whether it was made here."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if optimizer.state or not any(p.grad is not None for p in params):
        return False
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=False)  # what a step may have left in the kept gradients
    return True


def gather_objects(obj) -> list:
    """Every rank's Python object, in rank order ([obj] for one process)."""
    if not dist.is_initialized():
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A tensor's mean over the ranks, detached (itself for one process)."""
    value = value.detach().clone()
    if _world_size() > 1:
        dist.all_reduce(value)
        value /= _world_size()
    return value


def any_over_ranks(*flags: torch.Tensor | bool, device: torch.device) -> list[bool]:
    """For each flag (a 0-dim tensor or a bool), whether it is true on any rank: one small
    all-reduce (none for one process) and one host sync for all of them."""
    values = torch.stack([torch.as_tensor(f, device=device).float() for f in flags])
    if _world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [v > 0 for v in values.tolist()]


def broadcast_object(obj, src: int = 0):
    """rank `src`'s Python object on every rank (identity for one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def as_local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 parameters and norms) or a plain one."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
