"""Tiled losses against the plain (n, N) logits: the same value and gradients, less memory.

Every comparison takes the value and the gradient of every input (image and text
features, logit_scale, logit_bias) from the plain loss (`tile_size=None` at these
sizes) and from the tiled one with small tiles, so that there are many blocks, a ragged
last one, and blocks the positives' diagonal crosses at any offset. The memory tests
count bytes with bigbatch.memory's meter, which sees every tensor the loss allocates (CPU
has no allocator statistics) and what it saves for backward.
"""

from __future__ import annotations

import contextlib
import functools
import time

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from bigbatch import tiled
from bigbatch.losses import ClipLoss, SigLipLoss, create_loss
from bigbatch.memory import MemoryMeter, storage_keys

FP32 = dict(rtol=1e-5, atol=1e-6)
HALF = dict(rtol=1e-2)  # bf16/fp16 gradients: the same float32 math, rounded once to 8/11 bits


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's few cores are shared; toy sizes run faster on one thread anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(n: int, dim: int = 32, *, bias: bool = True, dtype=torch.float32, seed: int = 0,
                columns: int | None = None) -> dict:
    """Unit features (so logits stay in the trained range), scale 10, bias -3."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda rows: F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)
    inputs = dict(image_features=unit(n).to(dtype), text_features=unit(columns or n).to(dtype),
                  logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-3.0) if bias else None)
    return inputs


def value_and_grads(fn, inputs: dict, context=contextlib.nullcontext) -> tuple[torch.Tensor, dict]:
    """The loss under `context` (autocast), backward outside it, as cached_backward does."""
    leaves = {k: v.clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    with context():
        value = fn(**leaves)
    value.backward()
    return value.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_grad_close(actual, expected, name, rtol=1e-5):
    """Relative error <= rtol against the tensor's scale (max |expected|), as in
    test_accumulation: entries near zero have no meaningful element-wise relative error."""
    assert actual.dtype == expected.dtype, name
    atol = rtol * expected.abs().max().item()
    assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_same(tiled_run, plain_run, rtol=1e-5, zero_grads=()):
    """Value and every gradient; `zero_grads` are zero in exact arithmetic (CLIP's bias:
    the softmax sums to the target), compared with an absolute tolerance."""
    (value, grads), (ref_value, ref_grads) = tiled_run, plain_run
    assert_close(value, ref_value, **FP32)
    assert grads.keys() == ref_grads.keys()
    for name, expected in ref_grads.items():
        if name in zero_grads:
            assert_close(grads[name], expected, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert_grad_close(grads[name], expected, name, rtol)


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}
SHAPES = [(100, 16), (96, 32), (37, 64), (1, 16), (2, 1), (45, 7)]  # (N, tile): ragged, even, one block, ...


@pytest.mark.parametrize("n, tile", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("loss, bias", [("clip", False), ("clip", True), ("siglip", True)])
def test_tiled_equals_plain_fp32(loss, bias, n, tile):
    inputs = make_inputs(n, bias=bias, seed=n)
    plain = value_and_grads(LOSSES[loss](), inputs)
    assert_same(value_and_grads(LOSSES[loss](tile_size=tile), inputs), plain,
                zero_grads=("logit_bias",) if loss == "clip" else ())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_equals_plain_half_precision_features(loss, dtype):
    inputs = make_inputs(100, dtype=dtype)
    plain = value_and_grads(LOSSES[loss](), inputs)
    ours = value_and_grads(LOSSES[loss](tile_size=16), inputs)
    assert ours[1]["image_features"].dtype == dtype  # gradients in the inputs' dtype
    assert_same(ours, plain, **HALF, zero_grads=("logit_bias",) if loss == "clip" else ())


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_float32_logits_under_autocast(loss):
    """Both paths switch autocast off: bf16 logits would lose the negatives' differences."""
    inputs = make_inputs(64)
    expected = value_and_grads(LOSSES[loss](), inputs)
    for tile_size in (None, 16):
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
        ours = value_and_grads(LOSSES[loss](tile_size=tile_size), inputs, autocast)
        assert_same(ours, expected, zero_grads=("logit_bias",) if loss == "clip" else ())


# --- the building blocks, rows n != columns N (a rank's rows under --local-loss)

def plain_logits(rows, columns, scale, bias):
    logits = scale * rows.float() @ columns.float().T
    return logits if bias is None else logits + bias


@pytest.mark.parametrize("n, N, start, tile", [(24, 60, 0, 7), (24, 60, 36, 7), (13, 40, 20, 16),
                                               (5, 5, 0, 2), (1, 9, 8, 4), (30, 31, 1, 64)])
def test_softmax_cross_entropy_of_a_slice_of_rows(n, N, start, tile):
    inputs = make_inputs(n, columns=N, seed=start)
    rows, columns = inputs["image_features"], inputs["text_features"]
    scalars = (inputs["logit_scale"], inputs["logit_bias"])
    weights = torch.rand(n, generator=torch.Generator().manual_seed(1))  # a non-uniform incoming grad

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (rows, columns, *scalars)]
        per_row = fn(*leaves)
        (per_row * weights).sum().backward()
        return per_row.detach(), {name: t.grad for name, t in zip(["rows", "columns", "scale", "bias"], leaves)}

    labels = torch.arange(start, start + n)
    plain = run(lambda r, c, s, b: F.cross_entropy(plain_logits(r, c, s, b), labels, reduction="none"))
    ours = run(lambda r, c, s, b: tiled.softmax_cross_entropy(r, c, s, b, start=start, tile=tile))
    assert_same(ours, plain, zero_grads=("bias",))


@pytest.mark.parametrize("n, N, start, tile", [(24, 60, 36, 7), (13, 40, 20, 16), (1, 9, 8, 4)])
def test_sigmoid_pair_loss_of_a_slice_of_rows(n, N, start, tile):
    inputs = make_inputs(n, columns=N, seed=start)
    rows, columns = inputs["image_features"], inputs["text_features"]
    scalars = (inputs["logit_scale"], inputs["logit_bias"])

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (rows, columns, *scalars)]
        per_row = fn(*leaves)
        per_row.sum().backward()
        return per_row.detach(), {name: t.grad for name, t in zip(["rows", "columns", "scale", "bias"], leaves)}

    def plain(r, c, s, b):
        signs = -torch.ones(n, N)
        signs[torch.arange(n), start + torch.arange(n)] = 1.0
        return -F.logsigmoid(signs * plain_logits(r, c, s, b)).sum(1)

    assert_same(run(lambda r, c, s, b: tiled.sigmoid_pair_loss(r, c, s, b, start=start, tile=tile)),
                run(plain))


def test_symmetric_returns_both_directions():
    inputs = make_inputs(50, bias=False)
    rows, columns, scale = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    logits, labels = plain_logits(rows, columns, scale, None), torch.arange(50)
    image_to_text, text_to_image = tiled.softmax_cross_entropy(rows, columns, scale, tile=8, symmetric=True)
    assert_close(image_to_text, F.cross_entropy(logits, labels, reduction="none"), **FP32)
    assert_close(text_to_image, F.cross_entropy(logits.T, labels, reduction="none"), **FP32)


def test_scale_of_shape_one_gets_a_gradient_of_shape_one():
    """FSDP2 turns logit_scale/logit_bias into (1,) parameters."""
    inputs = make_inputs(20)
    inputs.update(logit_scale=inputs["logit_scale"].reshape(1), logit_bias=inputs["logit_bias"].reshape(1))
    for loss in ("clip", "siglip"):
        _, grads = value_and_grads(LOSSES[loss](tile_size=8), inputs)
        assert grads["logit_scale"].shape == grads["logit_bias"].shape == (1,)


def test_only_large_batches_are_tiled_by_default():
    loss = ClipLoss()
    assert loss.tile(8192, 8192) is None  # 256 MiB of logits: the plain matmul
    assert loss.tile(8193, 8193) == tiled.DEFAULT_TILE
    assert loss.tile(2048, 65536) == tiled.DEFAULT_TILE  # a rank's rows under --local-loss
    assert ClipLoss(tile_size=32).tile(4, 4) == 32
    assert create_loss("siglip", tile_size=8).tile_size == 8
    assert tiled.choose_tile(512, 65536) is None  # 2^25 logits, 128 MiB


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        ClipLoss(tile_size=0)
    features = torch.randn(4, 8)
    with pytest.raises(ValueError, match="among the 4 columns"):
        tiled.softmax_cross_entropy(features, features, torch.ones(()), start=1)
    with pytest.raises(ValueError, match="symmetric"):
        tiled.softmax_cross_entropy(features[:2], features, torch.ones(()), symmetric=True)


# --- memory

def working_set(loss_fn, inputs: dict) -> tuple[int, int]:
    """(peak bytes the loss's forward + backward allocate, bytes saved for its backward)."""
    peak, saved, _ = measured_run(loss_fn, inputs)
    return peak, saved


def measured_run(loss_fn, inputs: dict) -> tuple[int, int, tuple]:
    """`working_set` (bigbatch.memory's meter: every tensor the loss's aten ops make, once
    per storage until its last reference dies, the inputs left out), and the run's value
    and gradients."""
    leaves = {k: v.clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    with MemoryMeter(storage_keys(leaves)) as meter:
        loss = loss_fn(**leaves)
        loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return meter.live.peak, meter.saved.peak, (loss.detach(), grads)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_working_set_is_linear_in_the_batch(loss):
    n, dim, tile = 2048, 512, 256
    inputs = make_inputs(n, dim)
    features = 2 * n * dim * 4  # both inputs, float32
    plain_peak, plain_saved = working_set(LOSSES[loss](), inputs)
    tiled_peak, tiled_saved = working_set(LOSSES[loss](tile_size=tile), inputs)
    # plain keeps (N, N) matrices for backward: two log-softmax outputs (CLIP), the signed
    # logits and log-sigmoid's buffer (SigLIP); tiled keeps its inputs and (N,) log-sum-exps
    assert plain_saved >= 2 * n * n * 4
    assert tiled_saved <= features + 4 * n * 4 + 1024
    # peak: plain 4-5 (N, N) float32; tiled the gradients (N, D) and a few (tile, tile)
    assert plain_peak >= 4 * n * n * 4
    assert tiled_peak <= features + 3 * tile * tile * 4 + n * dim * 4
    assert tiled_peak < plain_peak / 7


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("tile", [None, 100, 1000])
def test_working_set_estimate_matches_a_measurement(loss, tile):
    n, dim = 768, 128
    inputs = make_inputs(n, dim)
    measured, _ = working_set(LOSSES[loss](tile_size=tile), inputs)
    estimate = tiled.loss_working_set_bytes(n, n, dim, tile, tiled=tile is not None, loss=loss)
    assert 0.75 * measured <= estimate <= 1.25 * measured


@pytest.mark.parametrize("n, dim, teacher_dim, tile", [
    (768, 128, 128, None), (768, 128, 128, 100), (512, 64, 64, 1000), (1024, 16, 16, 256),
    (256, 32, 2048, None), (512, 32, 1024, 128), (256, 128, 32, 64)])  # a wide teacher, a narrow one
def test_distillation_working_set_estimate_matches_a_measurement(n, dim, teacher_dim, tile):
    """The teacher's features are inputs (made before the loss), like the student's."""
    from bigbatch.losses import DistillClipLoss
    inputs = make_inputs(n, dim, bias=False)
    teacher = make_inputs(n, teacher_dim, bias=False, seed=1)

    def loss(image_features, text_features, logit_scale, logit_bias=None):
        return DistillClipLoss(tile_size=tile)(image_features, text_features, logit_scale, teacher["image_features"],
                                               teacher["text_features"], torch.tensor(12.0))
    measured, _ = working_set(loss, inputs)
    estimate = tiled.loss_working_set_bytes(n, n, dim, tile, tiled=tile is not None, loss="distill",
                                            teacher_dim=teacher_dim)
    assert 0.75 * measured <= estimate <= 1.25 * measured


def test_working_set_estimate_of_a_ranks_rows():
    """--local-loss: this rank's n rows in both directions, as ClipLoss runs them."""
    from bigbatch.losses import _cross_entropy_sum
    n, N, dim, tile = 256, 1024, 64, 128
    inputs = make_inputs(N, dim)
    own = {k: inputs[k][:n] for k in ("image_features", "text_features")}

    def local(image_features, text_features, logit_scale, logit_bias, own_images, own_texts):
        return (_cross_entropy_sum(own_images, text_features, 0, logit_scale, None, tile)
                + _cross_entropy_sum(own_texts, image_features, 0, logit_scale, None, tile))

    measured, _ = working_set(local, {**inputs, "own_images": own["image_features"],
                                      "own_texts": own["text_features"]})
    estimate = tiled.loss_working_set_bytes(n, N, dim, tile, tiled=True)
    assert 0.75 * measured <= estimate <= 1.25 * measured


# --- a large batch on CPU against float64

@pytest.mark.slow
def test_large_batch_against_float64_blockwise():
    """N = 16384, D = 512 with the default tile: tiled float32 vs a float64 reference.

    The reference streams over row blocks in float64 (never (N, N) at once): the row
    and column log-sum-exps give the loss; the feature gradients are checked on a
    subset of rows and columns, logit_scale's gradient in full.
    """
    n, dim = 16384, 512
    inputs = make_inputs(n, dim, bias=False, seed=3)
    images, texts, scale = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    started = time.perf_counter()
    peak, _, (loss, grads) = measured_run(ClipLoss(), inputs)  # N > 8192: tiled by default
    elapsed = time.perf_counter() - started

    assert peak <= 1.25 * tiled.loss_working_set_bytes(n, n, dim, tiled.DEFAULT_TILE)
    assert peak < tiled.loss_working_set_bytes(n, n, dim, tiled=False) / 10

    i64, t64, s64 = images.double(), texts.double(), scale.double()
    block = 2048
    row_lse = torch.empty(n, dtype=torch.float64)
    col_lse = torch.full((n,), -float("inf"), dtype=torch.float64)
    for i in range(0, n, block):
        logits = s64 * i64[i:i + block] @ t64.T
        row_lse[i:i + block] = logits.logsumexp(1)
        col_lse = torch.logaddexp(col_lse, logits.logsumexp(0))
    positives = s64 * (i64 * t64).sum(1)
    expected = ((row_lse - positives).sum() + (col_lse - positives).sum()) / (2 * n)
    assert_close(loss.double(), expected, rtol=1e-6, atol=0)

    # dL/dlogits = (softmax_row + softmax_col - 2 * target) / (2N); rows 0, 17, ... of images
    d_scale = torch.zeros((), dtype=torch.float64)
    some = torch.arange(0, n, 17)
    d_images = torch.empty(len(some), dim, dtype=torch.float64)
    d_texts = torch.zeros(len(some), dim, dtype=torch.float64)
    for i in range(0, n, block):
        raw = i64[i:i + block] @ t64.T
        grad = (s64 * raw - row_lse[i:i + block, None]).exp() + (s64 * raw - col_lse[None]).exp()
        grad.diagonal(i).sub_(2.0)
        grad /= 2 * n
        d_scale += (grad * raw).sum()
        mine = some[(some >= i) & (some < i + block)]
        d_images[(some >= i) & (some < i + block)] = s64 * grad[mine - i] @ t64
        d_texts += s64 * grad[:, some].T @ i64[i:i + block]
    assert_grad_close(grads["image_features"][some].double(), d_images, "image_features")
    assert_grad_close(grads["text_features"][some].double(), d_texts, "text_features")
    assert_close(grads["logit_scale"].double(), d_scale, rtol=1e-4, atol=1e-7)
    print(f"\nN={n} D={dim}: tiled float32 forward+backward {elapsed:.1f} s; peak {peak / 2**20:.0f} MiB")


@pytest.mark.parametrize("tile_size", [None, 5, 23], ids=["plain", "tiled", "one-tile"])
def test_distillation_equals_open_clips_distill_clip_loss(tile_size):
    """Value and gradients against open_clip's DistillClipLoss; a teacher of another width
    (24), its features constants; with tiles both terms are taken in blocks (ragged: 23
    rows in tiles of 5), never as (N, N) logits."""
    import open_clip

    from bigbatch.losses import DistillClipLoss

    student = make_inputs(23, bias=False)
    student.pop("logit_bias")
    teacher = make_inputs(23, dim=24, bias=False, seed=1)
    teacher = dict(dist_image_features=teacher["image_features"],
                   dist_text_features=teacher["text_features"], dist_logit_scale=torch.tensor(20.0))
    peer = open_clip.loss.DistillClipLoss()
    ref = value_and_grads(lambda **s: sum(peer(**s, **teacher, output_dict=True).values()), student)
    ours = DistillClipLoss(tile_size=tile_size)
    assert_same(value_and_grads(lambda **s: ours(**s, **teacher), student), ref)
    terms = peer(**student, **teacher, output_dict=True)
    for name, term in terms.items():
        assert_close(ours.terms[name], term, **FP32)


@pytest.mark.parametrize("n, N, symmetric, tile", [(7, 7, True, 3), (5, 11, False, 4), (9, 9, True, 100)])
def test_tiled_soft_cross_entropy_equals_the_plain_one(n, N, symmetric, tile):
    """Per-row (and per-column) distillation terms and their gradients, blocks against the
    (n, N) softmaxes; the teacher (another width) gets no gradient."""
    from bigbatch.tiled import soft_cross_entropy
    torch.manual_seed(0)
    rows, columns = torch.randn(n, 6, requires_grad=True), torch.randn(N, 6, requires_grad=True)
    scale = torch.tensor(2.3, requires_grad=True)
    teacher_rows, teacher_columns, teacher_scale = torch.randn(n, 5), torch.randn(N, 5), torch.tensor(3.0)
    weights = torch.randn(n), torch.randn(N)
    student, teacher = scale * rows @ columns.T, teacher_scale * teacher_rows @ teacher_columns.T
    expected = [-(teacher.softmax(1) * student.log_softmax(1)).sum(1),
                -(teacher.T.softmax(1) * student.T.log_softmax(1)).sum(1)][:1 + symmetric]
    got = soft_cross_entropy(rows, columns, scale, teacher_rows, teacher_columns, teacher_scale,
                             tile=tile, symmetric=symmetric)
    got = list(got) if symmetric else [got]
    for a, b in zip(got, expected):  # lse(S_i) - sum_j p_ij S_ij: a difference, in float32
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    inputs = (rows, columns, scale)
    reference = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), inputs)
    for a, b in zip(torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), inputs), reference):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- token cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,vocab,chunk_rows", [(37, 11, 4), (300, 1000, 7), (5, 50, 100)])
def test_token_cross_entropy_equals_torchs(monkeypatch, dtype, rows, vocab, chunk_rows):
    """Value and gradient of F.cross_entropy(reduction="sum", ignore_index) on float32 logits,
    over chunks of rows (a ragged last one, or one chunk), the gradient in the logits' dtype."""
    from bigbatch import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_NUMBERS", chunk_rows * vocab)
    g = torch.Generator().manual_seed(rows)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = 0  # padding
    ours = cross_entropy.token_cross_entropy(logits, labels, 0)
    (grad,) = torch.autograd.grad(0.3 * ours, logits)
    reference = F.cross_entropy(logits.float(), labels, ignore_index=0, reduction="sum")
    (expected,) = torch.autograd.grad(0.3 * reference, logits)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    assert_close(ours, reference)
    assert_close(grad, expected)
    assert not grad[::4].any()  # padded rows get no gradient


def test_token_cross_entropy_keeps_nothing_larger_than_the_logits(monkeypatch):
    """Saved: the logits (already alive) and a float32 number per row; backward's peak: the
    gradient in the logits' dtype and one float32 chunk, against F.cross_entropy's three
    float32 tensors of the logits' size."""
    from bigbatch import cross_entropy

    rows, vocab, chunk = 64, 512, 8
    monkeypatch.setattr(cross_entropy, "CHUNK_NUMBERS", chunk * vocab)
    logits = torch.randn(rows, vocab).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(1, vocab, (rows,))
    size = rows * vocab * 2

    def step_peak(loss_of) -> int:
        with MemoryMeter(storage_keys(logits, labels)) as meter:
            loss_of(logits).backward()
        logits.grad = None
        return meter.result()["live_peak_bytes"]

    ours = step_peak(lambda x: cross_entropy.token_cross_entropy(x, labels, 0))
    theirs = step_peak(lambda x: F.cross_entropy(x.float(), labels, ignore_index=0, reduction="sum"))
    assert ours <= size + chunk * vocab * 4 + 4 * rows * 8  # gradient + a chunk + per-row numbers
    assert theirs >= 3 * 2 * size  # three float32 tensors the logits' size
