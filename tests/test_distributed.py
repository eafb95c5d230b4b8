"""Distributed steps on CPU (gloo) against one process on the whole global batch.

Each case spawns ranks that take one `cached_backward` step (K=3 micro-batches of 4 per
rank, dropout and patch dropout on) and save their loss and gradients. The reference
replays the same micro-batches in one process, rank r's under the seed rank r used (so
the dropout masks match), concatenates the features rank-major, takes the
single-process loss once and calls backward once: the gradient, and the loss, that
every rank must hold after its step.

Wrappers: DDP, FSDP2, and "average" (no wrapper; gradients all-reduced and divided by
the world size by hand, which is what DDP does): the latter checks the losses' maths
apart from any wrapper. Spawning costs seconds of imports, so all cases of one world
size run in one spawn, forked from a server that imported everything once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from bigbatch.accumulation import cached_backward
from bigbatch.distributed import Launch, World, cleanup, init_distributed, world_from_env
from bigbatch.losses import CaptionLoss, ClipLoss, create_loss
from bigbatch.teacher import Teacher
from tiny_models import batches, open_clip_coca, open_clip_teacher, open_clip_vit, padded_batches

INIT_SEED, STEP_SEED, DATA_SEED = 1234, 7, 100
FP32 = dict(rtol=1e-5, atol=1e-7)
EVEN = ((4, 4, 4),) * 2  # micro-batch sizes per rank

@dataclass(frozen=True)
class Case:
    loss: str = "clip"  # clip | siglip | coca (clip + the caption loss) | distill (clip + a teacher's)
    local_loss: bool = False
    gather_with_grad: bool = False
    wrap: str = "ddp"  # ddp | fsdp2 | average (no wrapper: gradients averaged by hand, as DDP would)
    sizes: tuple[tuple[int, ...], ...] = EVEN
    tile_size: int | None = None  # the loss in blocks of this size (bigbatch.tiled)
    static_graph: bool = False  # DDP(static_graph=True): --ddp-static-graph

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    def __str__(self) -> str:
        flags = "-local" * self.local_loss + "-gather" * self.gather_with_grad
        tile = f"-tile{self.tile_size}" if self.tile_size else ""
        static = "-static" * self.static_graph
        return f"{self.loss}{flags}{tile}{static}-{self.wrap}-" + "_".join("".join(map(str, s)) for s in self.sizes)


# --- what each rank runs

def make_model(case: Case) -> torch.nn.Module:
    torch.manual_seed(INIT_SEED)
    if case.loss == "coca":
        return open_clip_coca(dropout=0.1)
    model = open_clip_vit(dropout=0.1, patch_dropout=0.3, siglip=case.loss == "siglip")
    if case.wrap == "fsdp2":  # fully_shard refuses 0-dim parameters
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(model, name, None), torch.nn.Parameter):
                setattr(model, name, torch.nn.Parameter(getattr(model, name).detach().reshape(1)))
    return model


def make_teacher(case: Case) -> Teacher | None:
    """The distillation teacher, the same on every rank (frozen: its own seed)."""
    if case.loss != "distill":
        return None
    torch.manual_seed(INIT_SEED + 1)
    return Teacher(open_clip_teacher())


def rank_batches(case: Case, rank: int) -> list:
    make = padded_batches if case.loss == "coca" else batches
    return make(list(case.sizes[rank]), seed=DATA_SEED + rank)


def make_loss(case: Case, world: World):
    return create_loss("clip" if case.loss == "coca" else case.loss, local_loss=case.local_loss,
                       gather_with_grad=case.gather_with_grad, rank=world.rank,
                       world_size=world.world_size, tile_size=case.tile_size)


def caption_loss(case: Case) -> CaptionLoss | None:
    return CaptionLoss() if case.loss == "coca" else None


def wrap(model: torch.nn.Module, case: Case, world: World, **ddp_options) -> torch.nn.Module:
    if case.wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, static_graph=case.static_graph, **ddp_options)
    if case.wrap == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world.world_size,))
        for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return model


def step_grads(case: Case, world: World) -> dict:
    """One cached step; the loss and every parameter's full gradient on this rank."""
    model, teacher = make_model(case), make_teacher(case)
    wrapped = wrap(model, case, world)
    torch.manual_seed(STEP_SEED + world.rank)
    loss = cached_backward(wrapped, rank_batches(case, world.rank), make_loss(case, world),
                           sample_loss=caption_loss(case), teacher=teacher)
    if case.wrap == "average":
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world.world_size
    return {"loss": loss, "grads": {n: _full(p.grad) for n, p in model.named_parameters()}}


def _full(grad: torch.Tensor) -> torch.Tensor:
    """FSDP2 holds each rank's shard as a DTensor; gather the whole (a collective)."""
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()


def count_syncs(case: Case, world: World) -> dict:
    """All-reduce calls in a plain K=1 step (= the number of buckets) and in a K=3 step."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def counting_allreduce(calls: list, bucket):
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)

    model = wrap(make_model(case), case, world, bucket_cap_mb=0.05)  # several small buckets
    calls: list[int] = []
    model.register_comm_hook(calls, counting_allreduce)
    loss_fn, micro_batches = make_loss(case, world), rank_batches(case, world.rank)

    def step(k: int) -> int:
        calls.clear()
        cached_backward(model, micro_batches[:k], loss_fn)
        model.zero_grad()
        return len(calls)

    step(1)  # DDP rebuilds its buckets after the first backward
    return {"plain": step(1), "cached": step(3)}


ASSETS = Path(__file__).parent / "assets"
# (model, micro-batch, K): activations above the gradients (pass 2 peaks), and below them
# (DDP's bucket rebuild at the second step peaks)
DDP_PEAKS = [(str(ASSETS / "test-clip.json"), 8, 3), ("bigbatch-tiny", 2, 2)]


def ddp_step_peaks(case: Case, world: World) -> dict:
    """bigbatch.plan.measure_peak on this rank under DDP: the trainer's step, measured."""
    from bigbatch.plan import measure_peak
    return {config: measure_peak(config[0], batch_size=config[1], accum_freq=config[2], world=world)[0]
            for config in DDP_PEAKS}


def kept_gradients(case: Case, world: World) -> dict:
    """The trainer's DDP over three steps (clipping, fused AdamW): whether .grad stays in
    DDP's buckets; and its weights against plain DDP's, whose gradients are dropped."""
    from bigbatch.build import adamw
    from bigbatch.distributed import full_state, wrap_model
    from bigbatch.model import parameter_groups
    from bigbatch.step import MAX_LOGIT_SCALE, optimizer_step, unscale_and_clip

    runs = {}
    for name in ("bigbatch", "plain"):
        model = make_model(case)
        wrapped = wrap_model(model, world) if name == "bigbatch" else wrap(model, case, world)
        optimizer = adamw(parameter_groups(model, 0.2), lr=1e-3)
        if name == "bigbatch":  # a checkpoint before any step: every parameter's state, all zero
            saved = full_state(wrapped, optimizer)[1].get("state", {})  # rank 0's (it saves)
            runs["saved_before_any_step"] = {k: float(v["exp_avg"].abs().sum()) for k, v in saved.items()}
        steps = []
        for _ in range(3):
            cached_backward(wrapped, rank_batches(case, world.rank), make_loss(case, world))
            unscale_and_clip(wrapped, optimizer, None, clip_norm=1.0)
            if name == "bigbatch":
                optimizer_step(wrapped, optimizer, None)
            else:  # the step as it was: gradients dropped
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads if g is not None}
            steps.append({"dropped": sum(g is None for g in grads), "storages": set(storages),
                          "bytes": sum(storages.values())})
        runs[name] = {"steps": steps, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    runs["gradient_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return runs


def validation_metrics(case: Case, world: World) -> dict:
    """Each rank evaluates its share of a synthetic validation set (37 samples: the ranks'
    shares differ); evaluate gathers them. One process: world None, the whole set."""
    from bigbatch.data import DataSpec, make_data
    from bigbatch.data.shapes import CLASSNAMES, TEMPLATES
    from bigbatch.evaluate import evaluate
    from bigbatch.model import create_model

    torch.manual_seed(INIT_SEED)
    bundle = create_model(str(Path(__file__).parent / "assets" / "test-clip.json"))
    rank, size = (world.rank, world.world_size) if world else (0, 1)
    spec = DataSpec(None, "synthetic", 5, num_samples=37, workers=0, is_train=False, rank=rank,
                    world_size=size)
    data = make_data(spec, bundle.preprocess_val, bundle.tokenizer)
    return evaluate(bundle.model, data.loader, loss_fn=ClipLoss(), tokenizer=bundle.tokenizer,
                    classnames=CLASSNAMES, templates=TEMPLATES[:2], across_ranks=world is not None)


def validation_failure(case: Case, world: World) -> dict:
    """Rank 1's data fails mid-way; every rank must raise its error, none hang in the gather."""
    from bigbatch.data import DataError
    from bigbatch.evaluate import evaluate

    def batches():
        yield from batches_of(4)
        if world.rank == 1:
            raise DataError("shard 7 is unreadable")
        yield from batches_of(4)

    def batches_of(n):
        for images, texts in rank_batches(case, world.rank)[:1]:
            yield images[:n], texts[:n]

    try:
        evaluate(make_model(case), batches(), across_ranks=True)
    except DataError as error:
        return {"raised": str(error)}
    return {"raised": None}


def _worker(rank: int, world_size: int, port: int, tasks: list, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # ranks share the cores
    world = init_distributed(device="cpu")
    try:
        for fn, case in tasks:
            try:
                result = fn(case, world)
            except Exception:  # recorded, so that the test says which case and why
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"{fn.__name__}-{case}.rank{rank}.pt")
    finally:
        cleanup()


# --- the parent: spawn, load, compare

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tasks: list, world_size: int, out_dir: Path, timeout: float = 120) -> None:
    # A fork server imports this module (torch, open_clip) once; every rank of every
    # spawn forks from it, instead of paying those imports per rank.
    mp.get_context("forkserver").set_forkserver_preload([__name__])
    ctx = mp.start_processes(_worker, args=(world_size, free_port(), tasks, str(out_dir)),
                             nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"{world_size} ranks did not finish in {timeout} s")


def spawned(tasks: list, world_size: int):
    """A module fixture: run all tasks in one spawn; returns a loader of per-rank results."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        out = tmp_path_factory.mktemp(f"ranks{world_size}")
        run_ranks(tasks, world_size, out)

        def load(fn, case: Case) -> list[dict]:
            results = [torch.load(out / f"{fn.__name__}-{case}.rank{r}.pt") for r in range(world_size)]
            for rank, result in enumerate(results):
                assert "error" not in result, f"rank {rank}:\n{result['error']}"
            return results
        return load
    return fixture


@functools.cache
def reference(case: Case) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradient of one process on all ranks' micro-batches, concatenated rank-major;
    distillation: open_clip's own DistillClipLoss, the teacher run once on the whole batch."""
    model = make_model(case)
    with one_thread():
        outs = []
        for rank in range(case.world_size):
            torch.manual_seed(STEP_SEED + rank)
            outs += [model(*mb) for mb in rank_batches(case, rank)]
        merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
        scalars = {k: outs[0][k] for k in ("logit_scale", "logit_bias") if k in outs[0]}
        if case.loss == "distill":
            import open_clip
            inputs = [mb for rank in range(case.world_size) for mb in rank_batches(case, rank)]
            images, texts = (torch.cat(t) for t in zip(*inputs))
            terms = open_clip.loss.DistillClipLoss()(**merged, **scalars, **make_teacher(case)(images, texts),
                                                     output_dict=True)
            loss = sum(terms.values())
        else:
            loss = create_loss("clip" if case.loss == "coca" else case.loss)(**merged, **scalars)
        caption = caption_loss(case)
        if caption is not None:  # over every rank's caption tokens at once
            tokens = {k: torch.cat([o[k] for o in outs]) for k in caption.keys}
            loss = loss + caption(tokens, caption.count(tokens))
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@contextlib.contextmanager
def one_thread():
    """Toy-sized ops run several times faster on one thread than on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_grad_close(actual, expected, name, rtol=1e-5):
    """Relative error <= rtol against the tensor's scale, as in test_accumulation."""
    atol = rtol * expected.abs().max().item()
    assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_matches_reference(results: list[dict], case: Case) -> None:
    ref_loss, ref_grads = reference(Case(case.loss, wrap="none", sizes=case.sizes))
    assert "logit_scale" in ref_grads
    for rank, result in enumerate(results):
        assert_close(result["loss"].reshape(()), ref_loss, **FP32)  # the global loss, every rank
        assert result["grads"].keys() == ref_grads.keys()
        for name, expected in ref_grads.items():
            actual = result["grads"][name].reshape(expected.shape)
            assert_grad_close(actual, expected, f"rank {rank} {name}")


# --- cases

LOSS_MODES = [Case(wrap="average"), Case(gather_with_grad=True, wrap="average"),
              Case(local_loss=True, gather_with_grad=True, wrap="average"),
              Case("siglip", wrap="average"),
              Case("siglip", local_loss=True, gather_with_grad=True, wrap="average")]
UNEVEN = Case(local_loss=True, gather_with_grad=True, wrap="average", sizes=((4, 4, 4), (4, 4, 2)))
DDP = [Case(local_loss=True, gather_with_grad=True), Case(gather_with_grad=True),
       Case("siglip", local_loss=True, gather_with_grad=True),
       # --ddp-static-graph is passed to DDP only for K = 1: its static graph breaks under the
       # two passes of a cached step (an internal assert in DDP's reducer)
       Case(local_loss=True, gather_with_grad=True, static_graph=True, sizes=((4,), (4,)))]
FSDP2 = Case(local_loss=True, gather_with_grad=True, wrap="fsdp2")
SYNCS = Case(local_loss=True, gather_with_grad=True)
# Tiled losses (5-row blocks: ragged, and straddling the ranks' boundary at row 12)
# against the same plain one-process reference.
TILED = [Case(local_loss=True, gather_with_grad=True, tile_size=5),
         Case("siglip", local_loss=True, gather_with_grad=True, tile_size=5),
         Case(tile_size=5, wrap="average")]
# CoCa: the caption loss's mean over tokens, ranks with different token counts
COCA = [Case("coca", local_loss=True, gather_with_grad=True),
        Case("coca", wrap="average", sizes=((4, 4, 4), (4, 4, 2)))]
# Distillation: the teacher's features gathered with the student's, its term over the global batch
DISTILL = [Case("distill", wrap="average"), Case("distill", local_loss=True, gather_with_grad=True),
           Case("distill", gather_with_grad=True, wrap="average", sizes=((4, 4, 4), (4, 4, 2))),
           Case("distill", local_loss=True, gather_with_grad=True, tile_size=5, wrap="average"),
           Case("distill", local_loss=True, gather_with_grad=True, wrap="fsdp2")]  # the student sharded
THREE = [Case(local_loss=True, gather_with_grad=True, wrap=w, sizes=((4, 4, 4),) * 3)
         for w in ("ddp", "average")]

two_ranks = spawned([(step_grads, c) for c in [*LOSS_MODES, UNEVEN, *DDP, FSDP2, *TILED, *COCA, *DISTILL]]
                    + [(count_syncs, SYNCS), (validation_metrics, Case()), (validation_failure, Case()),
                       (ddp_step_peaks, Case()), (kept_gradients, SYNCS)],
                    world_size=2)
three_ranks = spawned([(step_grads, c) for c in THREE], world_size=3)


@pytest.mark.parametrize("case", LOSS_MODES, ids=str)
def test_every_loss_mode_is_exact_once_gradients_are_averaged(two_ranks, case):
    assert_matches_reference(two_ranks(step_grads, case), case)


def test_uneven_last_step(two_ranks):
    assert_matches_reference(two_ranks(step_grads, UNEVEN), UNEVEN)


@pytest.mark.parametrize("case", DDP, ids=str)
def test_ddp_cached_step_equals_one_process_on_the_global_batch(two_ranks, case):
    assert_matches_reference(two_ranks(step_grads, case), case)


@pytest.mark.parametrize("case", TILED, ids=str)
def test_tiled_loss_equals_one_process_on_the_global_batch(two_ranks, case):
    assert_matches_reference(two_ranks(step_grads, case), case)


@pytest.mark.parametrize("case", THREE, ids=str)
def test_three_ranks(three_ranks, case):
    assert_matches_reference(three_ranks(step_grads, case), case)


@pytest.mark.parametrize("case", COCA, ids=str)
def test_coca_caption_loss_equals_one_process_on_the_global_batch(two_ranks, case):
    assert_matches_reference(two_ranks(step_grads, case), case)


@pytest.mark.parametrize("case", DISTILL, ids=str)
def test_distillation_equals_open_clips_objective_on_the_global_batch(two_ranks, case):
    assert_matches_reference(two_ranks(step_grads, case), case)


def test_fsdp2_cached_step_equals_one_process_on_the_global_batch(two_ranks):
    """The same reference DDP is held to; logit_scale is (1,) here: fully_shard needs >= 1 dim."""
    assert_matches_reference(two_ranks(step_grads, FSDP2), FSDP2)


def test_validation_split_across_ranks_equals_one_process(two_ranks):
    """Recall and zero-shot accuracy of the whole set. (val_loss, the mean of per-batch
    losses, depends on which samples share a batch, as in open_clip_train.)"""
    expected = validation_metrics(Case(), None)
    assert expected["num_samples"] == 37 and "zeroshot_top1" in expected
    for metrics in two_ranks(validation_metrics, Case()):
        assert metrics.keys() == expected.keys() and metrics.pop("val_loss") > 0
        for name, value in expected.items():
            if name == "val_loss":
                continue
            if isinstance(value, float):
                assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert metrics[name] == value, name


def test_a_validation_error_on_one_rank_is_raised_on_every_rank(two_ranks):
    assert [r["raised"] for r in two_ranks(validation_failure, Case())] == ["shard 7 is unreadable"] * 2


def test_ddp_all_reduces_once_per_optimizer_step(two_ranks):
    for counts in two_ranks(count_syncs, SYNCS):
        assert counts["plain"] >= 2, "the test needs several buckets"
        assert counts["cached"] == counts["plain"]  # K=3, yet one backward's worth of buckets


def test_ddp_keeps_one_copy_of_the_gradients_its_buckets(two_ranks):
    for result in two_ranks(kept_gradients, SYNCS):
        first, *later = result["bigbatch"]["steps"]
        for step in result["bigbatch"]["steps"]:  # zeroed after each step, never dropped: bucket views
            assert step["dropped"] == 0 and step["bytes"] == result["gradient_bytes"]
        assert first["storages"] != later[0]["storages"]  # rebuilt once, at step 2 (the plan's phase)
        assert later[0]["storages"] == later[1]["storages"]  # then the same
        assert all(step["dropped"] for step in result["plain"]["steps"])  # the comparison's point
        for name, plain in result["plain"]["weights"].items():  # the same training, step for step
            assert_close(result["bigbatch"]["weights"][name], plain, rtol=0, atol=0, msg=name)
    # a checkpoint before any step holds every parameter's (zero) AdamW state, as without DDP
    saved = two_ranks(kept_gradients, SYNCS)[0]["saved_before_any_step"]
    assert sorted(saved) == sorted(result["plain"]["weights"]) and not any(saved.values())


@pytest.mark.parametrize("config, expected_phase", zip(DDP_PEAKS, ["pass 2", "bucket rebuild"]),
                         ids=lambda c: f"{Path(c[0]).stem}-b{c[1]}x{c[2]}" if isinstance(c, tuple) else c)
def test_plan_within_10_percent_of_a_measured_ddp_step(two_ranks, config, expected_phase):
    """The plan's DDP terms (buckets holding the gradients; their rebuild, beside the old ones,
    at the second step) against the peak each of two ranks measured over the trainer's second
    step (gloo, bigbatch's meter)."""
    from bigbatch import plan
    model, batch_size, accum_freq = config
    options = plan.PlanOptions(model, world_size=2, local_loss=True, precision="fp32", target="cpu")
    planned = plan.estimate_memory(options, batch_size=batch_size, accum_freq=accum_freq)
    assert planned.phase == expected_phase
    for result in two_ranks(ddp_step_peaks, Case()):
        assert planned.peak == pytest.approx(result[config], rel=0.10)


# --- flags and launch environment, in process

@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_local_loss_without_gather_with_grad_is_refused(loss):
    with pytest.raises(ValueError, match="--local-loss needs --gather-with-grad"):
        create_loss(loss, local_loss=True, rank=0, world_size=2)


def test_many_ranks_without_a_process_group_is_a_clear_error():
    features = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="init_distributed"):
        ClipLoss(world_size=2)(features, features, torch.ones(()))


def test_world_from_torchrun_env():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # torchrun inside srun
    assert world_from_env(env) == Launch(3, 1, 8, "10.0.0.1", "29400")


def test_world_from_slurm_env():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_NODELIST": "gpu-[03-06,09],cpu1", "SLURM_JOB_ID": "123456",
           "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3"}
    assert world_from_env(env) == Launch(5, 1, 8, "gpu-03", "29956")
    del env["SLURM_NODELIST"]
    assert world_from_env(env).master_addr == "10.1.2.3"
    exported = world_from_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (exported.master_addr, exported.master_port) == ("h", "1")


@pytest.mark.parametrize("nodelist, host", [("node7", "node7"), ("a1,a2", "a1"),
                                            ("x[1,3-4]", "x1"), ("rack2-n[010-012]", "rack2-n010")])
def test_first_slurm_host(nodelist, host):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": nodelist}
    assert world_from_env(env).master_addr == host


def test_one_process_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    world = init_distributed(device="cpu")
    assert world == World(0, 0, 1, torch.device("cpu")) and world.is_main
    assert not dist.is_initialized()


def test_launch_without_master_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed(device="cpu")
