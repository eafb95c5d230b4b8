"""Memory planner: batch arithmetic, memory strings, and the meta estimate against real CPU runs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from pathlib import Path

import open_clip
import pytest
import torch

from bigbatch import plan
from bigbatch.errors import ConfigError
from bigbatch.memory import MemoryMeter, storage_keys
from bigbatch.model import create_model
from bigbatch.plan import MemoryPlan, PlanOptions, derive_accum_freq, format_plan, parse_memory
from bigbatch.plan import measure
from bigbatch.plan.command import main

TINY = str(Path(__file__).parent / "assets" / "test-clip.json")
COCA = str(Path(__file__).parent / "assets" / "test-coca.json")
GiB = 1024 ** 3


def estimate_memory(model: str, *, batch_size: int, accum_freq: int, **options) -> MemoryPlan:
    """plan.estimate_memory with these PlanOptions, in bf16 autocast unless told."""
    options = PlanOptions(model, **{"precision": "amp_bf16", **options})
    return plan.estimate_memory(options, batch_size=batch_size, accum_freq=accum_freq)


def find_max_batch_size(model: str, *, gpu_memory: int, global_batch_size: int | None = None,
                        accum_freq: int | None = None, max_batch_size: int = 1 << 16) -> int:
    options = PlanOptions(model, precision="amp_bf16", gpu_memory=gpu_memory)
    return plan.find_max_batch_size(options, global_batch_size=global_batch_size,
                                    accum_freq=accum_freq, max_batch_size=max_batch_size)


# --- batch arithmetic and memory strings

def test_derive_accum_freq():
    assert derive_accum_freq(32768, 256, 4) == 32
    assert derive_accum_freq(4096, 4096, 1) == 1
    assert derive_accum_freq(96, 3, 2) == 16


def test_derive_accum_freq_names_the_micro_batches_that_divide():
    with pytest.raises(ConfigError) as error:
        derive_accum_freq(32768, 300, 1)
    message = str(error.value)
    assert "--batch-size" in message
    assert "256 (accum-freq 128)" in message and "512 (accum-freq 64)" in message
    with pytest.raises(ConfigError, match="--world-size 3"):
        derive_accum_freq(1000, 8, 3)
    with pytest.raises(ConfigError, match="positive"):
        derive_accum_freq(1024, 0, 1)


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * GiB
    assert parse_memory("80GB") == 80 * 10 ** 9
    assert parse_memory("512MiB") == 512 * 2 ** 20
    assert parse_memory("1.5 GiB") == int(1.5 * GiB)
    assert parse_memory("40960M") == 40 * GiB  # nvidia-smi's MiB
    assert parse_memory("24gib") == 24 * GiB
    for bad in ("24", "lots", "24 parsecs", "", "-3GiB"):
        with pytest.raises(ConfigError, match="e.g. 24GiB"):
            parse_memory(bad)


# --- the meta estimate against the real model on CPU

@pytest.fixture(scope="module")
def real_tiny():
    torch.manual_seed(0)
    return create_model(TINY).model.train()  # as training builds it: uint8 images normalised inside


def real_saved_bytes(model, batch_size: int, dtype: torch.dtype | None, checkpointing: bool = False) -> int:
    """Bytes of the storages a real CPU forward saves for backward, each once (bigbatch's
    meter); parameters, buffers and the inputs left out (the planner counts them as weights
    and inputs)."""
    model.set_grad_checkpointing(checkpointing)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8)
    texts = torch.randint(1, 1000, (batch_size, 16))
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    try:
        with MemoryMeter(storage_keys(model, images, texts), track_live=False) as meter, autocast:
            model(images, texts)
            saved = meter.saved.current
    finally:
        model.set_grad_checkpointing(False)
    return saved


@pytest.mark.parametrize("precision, dtype, target", [
    ("fp32", None, "cpu"), ("amp_bf16", torch.bfloat16, "cpu"),
    ("fp32", None, "cuda"),  # CUDA's fused attention keeps what CPU's flash kernel keeps
])
def test_meta_activations_match_a_real_cpu_forward(real_tiny, precision, dtype, target):
    real = real_saved_bytes(real_tiny, 16, dtype)
    estimate = estimate_memory(TINY, batch_size=16, accum_freq=1, precision=precision, target=target)
    assert estimate.source == "meta estimate"
    assert estimate.activations == pytest.approx(real, rel=0.10)


def test_coca_activations_include_its_caption_loss():
    """The caption logits (B, T, vocab), kept for the loss's backward, their gradient and a
    float32 chunk of them (here the whole: fewer rows than a chunk): a CoCa's largest
    tensors. Whole steps: test_plan_within_10_percent_of_a_measured_step."""
    estimate = estimate_memory(COCA, batch_size=8, accum_freq=1, precision="fp32", target="cpu")
    caption = 8 * 15 * 49408 * 4
    assert estimate.activations > 3 * caption


@pytest.mark.parametrize("precision, checkpointing", [("amp_bf16", False), ("fp32", True)])
def test_coca_plan_with_its_caption_loss_in_chunks(monkeypatch, precision, checkpointing):
    """Logits of more rows than a chunk of the loss (bigbatch.cross_entropy): the plan counts
    the chunks at their size, not the logits', and stays within 10% of a measured step."""
    from bigbatch import cross_entropy

    def both() -> tuple[int, int]:
        measure.fake_profile.cache_clear()  # profiles are cached by model and batch, not chunk
        measured, _ = plan.measure_peak(COCA, batch_size=8, accum_freq=2, precision=precision,
                                        grad_checkpointing=checkpointing)
        return measured, estimate_memory(COCA, batch_size=8, accum_freq=2, precision=precision,
                                         grad_checkpointing=checkpointing, target="cpu").peak

    try:
        whole = both()
        monkeypatch.setattr(cross_entropy, "CHUNK_NUMBERS", 8 * 49408)  # 8 of the 120 rows
        measured, planned = both()
    finally:
        measure.fake_profile.cache_clear()
    assert planned == pytest.approx(measured, rel=0.10)
    assert measured < whole[0] and planned < whole[1]


def test_cuda_autocast_keeps_more_than_cpu_autocast():
    """CUDA autocast runs LayerNorm in float32 and saves its float32 input; CPU does not."""
    cpu = estimate_memory(TINY, batch_size=16, accum_freq=1, target="cpu").activations
    cuda = estimate_memory(TINY, batch_size=16, accum_freq=1, target="cuda").activations
    fp32 = estimate_memory(TINY, batch_size=16, accum_freq=1, precision="fp32").activations
    assert cpu < cuda < fp32


def test_activations_scale_linearly_with_the_micro_batch():
    a8, a16, a32 = (estimate_memory(TINY, batch_size=b, accum_freq=1).activations for b in (8, 16, 32))
    assert a32 - a16 == pytest.approx(2 * (a16 - a8), rel=0.01)
    assert 1.5 < a16 / a8 <= 2.0  # plus a constant: autocast's bf16 weight copies
    big = estimate_memory(TINY, batch_size=256, accum_freq=1).activations
    assert big == pytest.approx(a8 + (256 - 8) / 8 * (a16 - a8), rel=0.01)


def test_grad_checkpointing_keeps_block_inputs_and_one_block(real_tiny):
    full = estimate_memory(TINY, batch_size=16, accum_freq=1, precision="fp32", target="cpu")
    ckpt = estimate_memory(TINY, batch_size=16, accum_freq=1, precision="fp32", target="cpu",
                           grad_checkpointing=True)
    assert ckpt.activations < full.activations
    assert ckpt.activations == full.activations_checkpointed
    # What stays between forward and backward is what open_clip's own checkpointing keeps.
    key = measure.model_key(TINY, False, None)
    kept = measure.fake_profile(key, "cpu", None, 16).checkpoint_kept
    assert kept == pytest.approx(real_saved_bytes(real_tiny, 16, None, checkpointing=True), rel=0.01)
    assert kept < ckpt.activations  # + the block being recomputed


def test_weights_gradients_and_adamw_state_are_exact(real_tiny):
    estimate = estimate_memory(TINY, batch_size=4, accum_freq=2)
    params = list(real_tiny.parameters())
    n_params = sum(p.numel() for p in params)
    assert estimate.weights == 4 * n_params + sum(b.numel() * b.element_size() for b in real_tiny.buffers())
    assert estimate.gradients == 4 * n_params
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                for name, t in s.items() if name != "step")
    for p in params:
        p.grad = None
    assert estimate.optimizer_state == state


def test_an_ema_of_the_weights_is_a_second_copy_on_the_device(real_tiny):
    from bigbatch.ema import ModelEMA
    plain = estimate_memory(TINY, batch_size=4, accum_freq=2)
    with_ema = estimate_memory(TINY, batch_size=4, accum_freq=2, ema_decay=0.999)
    ema = ModelEMA(real_tiny, 0.999).module
    copy = sum(t.numel() * t.element_size() for t in [*ema.parameters(), *ema.buffers()])
    assert with_ema.ema_weights == copy and with_ema.weights == plain.weights + copy
    assert with_ema.peak == plain.peak + copy


def test_terms_follow_the_step():
    one = estimate_memory(TINY, batch_size=32, accum_freq=1)
    assert one.cached_features == 0 and one.global_batch_size == 32
    eight = estimate_memory(TINY, batch_size=32, accum_freq=8)
    per_sample = 2 * 32 * 4  # image and text features, D = 32, float32
    assert eight.cached_features == 2 * 256 * per_sample  # leaves, gradients
    assert eight.inputs == 8 * one.inputs
    assert one.inputs == 32 * (3 * 32 * 32 * 1 + 16 * 8)  # uint8 images, int64 tokens
    # offloaded: the micro-batch computing and the next one, its copy overlapping
    assert estimate_memory(TINY, batch_size=32, accum_freq=8, offload_inputs=True).inputs == 2 * one.inputs
    ddp = estimate_memory(TINY, batch_size=32, accum_freq=8, world_size=4, local_loss=True)
    assert ddp.gradients == eight.gradients and ddp.global_batch_size == 1024
    # DDP's buckets (G) from the start, and .grad views of them: G in every phase, once
    assert ddp.ddp_buckets == ddp.gradients
    assert ddp.peak == ddp.weights + ddp.optimizer_state + ddp.inputs + max(
        ddp.activations + ddp.cached_features + ddp.loss_working_set + ddp.ddp_buckets,
        ddp.activations + 256 * per_sample + ddp.gradients + ddp.gradient_transient)
    assert ddp.gradient_transient == 4 * 49408 * 32  # the token embedding's gradient
    fsdp = estimate_memory(TINY, batch_size=32, accum_freq=8, world_size=4, local_loss=True, fsdp=True)
    assert fsdp.ddp_buckets == 0 and fsdp.peak == ddp.weights + ddp.optimizer_state + ddp.inputs + max(
        ddp.activations + ddp.cached_features + ddp.loss_working_set,
        ddp.activations + 256 * per_sample + ddp.gradients + ddp.gradient_transient)


def test_large_global_batches_use_a_tiled_loss():
    small = estimate_memory(TINY, batch_size=64, accum_freq=16)
    large = estimate_memory(TINY, batch_size=1024, accum_freq=64)  # N = 65536
    assert small.loss_tile is None and large.loss_tile is not None
    assert large.loss_working_set < 4 * 65536 ** 2  # never the (N, N) logits


def test_find_max_batch_size_is_the_largest_that_fits():
    target = estimate_memory(TINY, batch_size=96, accum_freq=1)
    memory = int(target.peak / (1 - plan.DEFAULT_RESERVE)) + 1
    assert find_max_batch_size(TINY, gpu_memory=memory, accum_freq=1, max_batch_size=4096) == 96
    # with a global batch, only divisors of G / W: 1000 = 100 x 10 fits, 125 x 8 does not
    target = estimate_memory(TINY, batch_size=100, accum_freq=10)
    memory = int(target.peak / (1 - plan.DEFAULT_RESERVE)) + 1
    assert find_max_batch_size(TINY, gpu_memory=memory, global_batch_size=1000) == 100


def test_format_plan_says_what_to_change():
    fits = estimate_memory(TINY, batch_size=8, accum_freq=4, gpu_memory=parse_memory("1GiB"))
    text = format_plan(fits)
    for row in ("weights", "gradients", "optimizer state", "activations", "cached features",
                "loss working set", "peak", "fits in 1.00 GiB"):
        assert row in text
    tight = estimate_memory(TINY, batch_size=256, accum_freq=4, gpu_memory=parse_memory("30MiB"))
    assert not tight.fits
    text = format_plan(tight)
    assert "does NOT fit" in text and "--grad-checkpointing" in text and "--accum-freq" in text
    assert "--offload-inputs" in text and "--world-size" in text


# --- the command

def run_plan(capsys, monkeypatch, *argv: str) -> str:
    """The command's output; it must build models on the meta device only (no real
    weights, no real forward: what makes it fast, counted rather than timed)."""
    devices = []
    create = open_clip.create_model

    def recording(*args, **kwargs):
        devices.append(str(kwargs.get("device")))
        return create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", recording)
    measure.fake_model.cache_clear()  # build it here, whatever ran before
    measure.fake_profile.cache_clear()
    assert main(list(argv)) == 0
    assert devices and set(devices) == {"meta"}
    return capsys.readouterr().out


def chosen(text: str) -> tuple[int, int, int]:
    match = re.search(r"global batch (\d+) = batch-size (\d+) x accum-freq (\d+)", text)
    return tuple(int(g) for g in match.groups())


def test_plan_vit_b_32_at_32k_on_80gib(capsys, monkeypatch):
    text = run_plan(capsys, monkeypatch, "--model", "ViT-B-32", "--global-batch-size", "32768",
                    "--gpu-memory", "80GiB")
    G, b, K = chosen(text)
    assert G == 32768 and b * K == 32768 and b > 1
    assert "fits in 80.00 GiB" in text and "--batch-size" in text


def test_plan_vit_l_14_at_4096_on_24gib_with_checkpointing(capsys, monkeypatch):
    text = run_plan(capsys, monkeypatch, "--model", "ViT-L-14", "--global-batch-size", "4096",
                    "--gpu-memory", "24GiB", "--grad-checkpointing")
    G, b, K = chosen(text)
    assert G == 4096 and b * K == 4096
    assert "with grad checkpointing" in text and "fits in 24.00 GiB" in text


def test_plan_that_cannot_fit_names_the_fixes():
    with pytest.raises(ConfigError) as error:
        main(["--model", "ViT-L-14", "--global-batch-size", "4096", "--gpu-memory", "1GiB"])
    message = str(error.value)
    assert "does not fit 1.00 GiB" in message and "--fsdp" in message


def test_plan_flags_are_checked():
    with pytest.raises(ConfigError, match="divides 1024"):
        main(["--model", TINY, "--global-batch-size", "1024", "--gpu-memory", "1GiB",
              "--batch-size", "100"])
    with pytest.raises(ConfigError, match="unit"):
        main(["--model", TINY, "--global-batch-size", "1024", "--gpu-memory", "24"])
    with pytest.raises(ConfigError, match="unknown --model"):
        main(["--model", "ViT-Q-99", "--global-batch-size", "1024", "--gpu-memory", "24GiB"])


@pytest.mark.parametrize("argv, message", [
    (["--global-batch-size", "0"], r"--global-batch-size must be between 1 and 2\*\*32"),
    (["--global-batch-size", str(10 ** 20)], r"--global-batch-size must be between 1 and 2\*\*32"),
    (["--accum-freq", "0"], r"--accum-freq must be between 1"),
    (["--global-batch-size", "64", "--loss-tile-size", "0"], "--loss-tile-size must be at least 1"),
    (["--global-batch-size", "64", "--force-patch-dropout", "1"], r"--force-patch-dropout must be in \[0, 1\)"),
    (["--global-batch-size", "64", "--ema-decay", "nan"], "--ema-decay must be a finite number"),
    (["--global-batch-size", "256", "--accum-freq", "3"], "use an --accum-freq that divides 256"),
])
def test_plan_refuses_what_train_refuses(argv, message):
    """The flags plan shares with train are checked as train checks them, before any search."""
    with pytest.raises(ConfigError, match=message):
        main(["--model", TINY, "--gpu-memory", "24GiB", *argv])


def test_plan_with_global_batch_and_accum_freq_fixes_the_micro_batch(capsys, monkeypatch):
    out = run_plan(capsys, monkeypatch, "--model", TINY, "--gpu-memory", "24GiB", "--global-batch-size", "256",
                   "--accum-freq", "4")
    assert chosen(out) == (256, 64, 4)


def test_plan_of_a_hugging_face_text_tower_names_what_is_missing():
    """RoBERTa's tower is built by transformers from files in the Hugging Face cache: without
    the package, or offline without the files (no test downloads them), the plan says which,
    not that fake tensors failed."""
    missing = "not in the local cache" if importlib.util.find_spec("transformers") else "pip install transformers"
    with pytest.raises(ConfigError, match=missing):
        main(["--model", "roberta-ViT-B-32", "--batch-size", "8", "--gpu-memory", "24GiB"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_probe_is_close_to_the_meta_estimate():
    meta = estimate_memory("ViT-B-32", batch_size=64, accum_freq=1)
    probe = estimate_memory("ViT-B-32", batch_size=64, accum_freq=1, device="cuda")
    assert probe.source == "probe on cuda"
    assert probe.weights == meta.weights
    # the probe also sees backward's transients, which the saved tensors leave out
    assert meta.activations * 0.8 < probe.activations < meta.activations * 1.5


def test_memory_plan_is_a_dataclass_with_the_breakdown():
    fields = set(MemoryPlan.__dataclass_fields__)
    assert {"batch_size", "accum_freq", "world_size", "global_batch_size", "weights", "gradients",
            "optimizer_state", "activations", "cached_features", "loss_working_set", "peak",
            "source"} <= fields


# --- the plan against a real step, measured (bigbatch.memory's meter on CPU)

@pytest.mark.parametrize("model, batch_size, accum_freq, checkpointing, precision", [
    (TINY, 1, 1, False, "fp32"), (TINY, 4, 2, False, "fp32"), (TINY, 8, 3, True, "fp32"),
    ("bigbatch-tiny", 8, 1, False, "fp32"), ("bigbatch-tiny", 2, 4, False, "fp32"),
    ("bigbatch-small", 4, 2, True, "fp32"),
    # CoCa: the caption loss's (B, T, vocab) tensors dominate; without autocast they are bf16
    (COCA, 8, 1, False, "fp32"), (COCA, 8, 3, True, "fp32"), (COCA, 8, 2, False, "pure_bf16"),
])
def test_plan_within_10_percent_of_a_measured_step(model, batch_size, accum_freq, checkpointing, precision):
    measured, _ = plan.measure_peak(model, batch_size=batch_size, accum_freq=accum_freq,
                                    grad_checkpointing=checkpointing, precision=precision)
    planned = estimate_memory(model, batch_size=batch_size, accum_freq=accum_freq, precision=precision,
                              grad_checkpointing=checkpointing, target="cpu")
    assert planned.peak == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("model", [TINY, "bigbatch-tiny"])
def test_plan_with_siglip_within_10_percent_of_a_measured_step(model):
    """--siglip: its sigmoid loss over the global batch, and its init."""
    measured, _ = plan.measure_peak(model, batch_size=32, accum_freq=4, siglip=True)
    planned = estimate_memory(model, batch_size=32, accum_freq=4, precision="fp32", siglip=True, target="cpu")
    assert planned.peak == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("precision", ["pure_bf16", "bf16"])
def test_plan_of_cast_weights_within_10_percent_of_a_measured_step(precision):
    """pure_bf16: weights, gradients and AdamW's moments in bf16; open_clip's bf16: only the
    products' weights (LayerNorms and embeddings stay float32). Both without autocast."""
    measured, _ = plan.measure_peak("bigbatch-tiny", batch_size=4, accum_freq=2, precision=precision)
    planned = estimate_memory("bigbatch-tiny", batch_size=4, accum_freq=2, precision=precision, target="cpu")
    fp32 = estimate_memory("bigbatch-tiny", batch_size=4, accum_freq=2, precision="fp32", target="cpu")
    assert planned.peak == pytest.approx(measured, rel=0.10)
    assert planned.optimizer_state == 2 * planned.gradients
    if precision == "pure_bf16":
        assert planned.weights == pytest.approx(fp32.weights / 2, rel=0.01)
        assert planned.gradients == pytest.approx(fp32.gradients / 2, rel=0.01)


TEACHER = str(Path(__file__).parent / "assets" / "test-teacher.json")  # wider than the students
STUDENT = str(Path(__file__).parent / "assets" / "test-student.json")  # narrow, a 1,000-token vocabulary
WIDE_TEACHER = str(Path(__file__).parent / "assets" / "test-wide-teacher.json")  # embeddings 32x the student's


@pytest.mark.parametrize("student, teacher, batch_size, accum_freq, phase", [
    ("bigbatch-tiny", TEACHER, 4, 2, "pass 2"),
    (STUDENT, TEACHER, 32, 2, "pass 1"),  # the teacher's inference beside the last micro-batch's graph
    (STUDENT, WIDE_TEACHER, 32, 8, "loss"),  # its features and the distillation term
    pytest.param("bigbatch-tiny", TEACHER, 8, 1, "pass 2", marks=pytest.mark.slow),
    pytest.param("bigbatch-tiny", TEACHER, 128, 8, "loss", marks=pytest.mark.slow),
])
def test_plan_with_a_teacher_within_10_percent_of_a_measured_step(student, teacher, batch_size, accum_freq, phase):
    """--distill-model: the teacher's weights, its cached features, its inference and the
    distillation term, each phase where it peaks."""
    measured, _ = plan.measure_peak(student, batch_size=batch_size, accum_freq=accum_freq,
                                    distill_model=teacher)
    planned = estimate_memory(student, batch_size=batch_size, accum_freq=accum_freq, precision="fp32",
                              target="cpu", distill_model=teacher)
    alone = estimate_memory(student, batch_size=batch_size, accum_freq=accum_freq, precision="fp32",
                            target="cpu")
    assert planned.peak == pytest.approx(measured, rel=0.10)
    assert planned.phase == phase
    assert alone.peak < 0.85 * measured  # what the plan said before it counted the teacher
    width = 1024 if teacher == WIDE_TEACHER else 128
    assert planned.teacher_weights > 0 and planned.teacher_features == 2 * width * 4 * batch_size * accum_freq


def test_a_plan_that_does_not_fit_names_the_teacher():
    distilling = estimate_memory(STUDENT, batch_size=32, accum_freq=2, distill_model=TEACHER, gpu_memory=1 << 20)
    assert not distilling.fits
    assert any("a smaller --distill-model" in text for text in plan.suggestions(distilling))


def test_plan_refuses_what_training_refuses_with_a_teacher():
    with pytest.raises(ConfigError, match="not SigLIP's"):
        estimate_memory(TINY, batch_size=4, accum_freq=2, siglip=True, distill_model=TEACHER)
    with pytest.raises(ConfigError, match="CoCa student"):
        estimate_memory("coca_ViT-B-32", batch_size=4, accum_freq=2, distill_model=TEACHER)
    with pytest.raises(ConfigError, match="CoCa student"):  # nor is a step measured with one
        plan.measure_peak(COCA, batch_size=2, accum_freq=2, distill_model=TINY)


@pytest.mark.slow
@pytest.mark.parametrize("model, batch_size, accum_freq, checkpointing", [
    ("ViT-B-32", 1, 2, False), ("ViT-B-32", 8, 1, False), ("ViT-B-32", 4, 2, True),
    ("ViT-L-14", 1, 2, False), ("ViT-L-14", 2, 1, True),
])
def test_plan_within_10_percent_of_a_measured_step_on_real_sizes(model, batch_size, accum_freq, checkpointing):
    test_plan_within_10_percent_of_a_measured_step(model, batch_size, accum_freq, checkpointing, "fp32")


def test_offload_is_chosen_only_when_the_inputs_alone_do_not_fit():
    layout = dict(batch_size=32, accum_freq=64)
    on_device = estimate_memory(TINY, **layout)
    offloaded = estimate_memory(TINY, offload_inputs=True, **layout)
    assert offloaded.peak < on_device.peak  # 64 micro-batches of uint8 images against 2

    def must_wait(gpu_memory: int):
        options = PlanOptions(TINY, precision="amp_bf16", gpu_memory=gpu_memory)
        return plan.inputs_must_wait_on_host(options, **layout)
    chosen = must_wait(int((offloaded.peak + on_device.peak) / 2 / (1 - plan.DEFAULT_RESERVE)))
    assert chosen is not None and not chosen.fits
    assert must_wait(2 * on_device.peak) is None  # fits
    assert must_wait(offloaded.peak // 2) is None  # hopeless


def test_plan_command_counts_a_teacher(capsys, monkeypatch):
    args = ("--model", TINY, "--global-batch-size", "64", "--batch-size", "16", "--gpu-memory", "24GiB")
    alone = run_plan(capsys, monkeypatch, *args)
    distilling = run_plan(capsys, monkeypatch, *args, "--distill-model", TEACHER)
    assert "the teacher's" not in alone
    assert "weights (+ the teacher's)" in distilling and "+ teacher's)" in distilling.split("cached features")[1]


def test_plan_check_script_smoke(tmp_path):
    """scripts/plan_check.py (the planner against measured steps on models the tests never
    build, bench/plan-vs-measured-cpu.*) runs, here on the test models."""
    from script_loader import load_script
    plan_check = load_script("plan_check", "plan_check")
    assert plan_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "plan-vs-measured-cpu-smoke.json").read_text())
    assert [abs(r["error_percent"]) < 10 for r in report["rows"]] == [True, True]
    assert (tmp_path / "plan-vs-measured-cpu-smoke.png").read_bytes()[:4] == b"\x89PNG"
