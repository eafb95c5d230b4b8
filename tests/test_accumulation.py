"""cached_backward against the gradient of the loss on the concatenated batch.

The reference runs every micro-batch forward WITH grad from the same RNG seed (so
dropout masks match), concatenates the features, takes the loss once and calls
backward once: by definition the large-batch gradient. Without randomness it must
also match one forward over the concatenated inputs.
"""

from __future__ import annotations

import functools
import weakref

import open_clip
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bigbatch.accumulation import cached_backward
from bigbatch.losses import CaptionLoss, ClipLoss, DistillClipLoss, SigLipLoss
from bigbatch.memory import MemoryMeter, storage_keys
from bigbatch.teacher import Teacher
from tiny_models import (batches, open_clip_coca, open_clip_teacher, open_clip_vit, padded_batches,
                         timm_tower)

FP32 = dict(rtol=1e-5, atol=1e-7)


def assert_grad_close(actual, expected, name, rtol=1e-5):
    """Relative error <= rtol, measured against the tensor's scale (max |expected|):
    entries near zero have no meaningful element-wise relative error."""
    atol = rtol * expected.abs().max().item()
    assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def reference_backward(model, micro_batches, loss_fn, seed):
    """Large-batch gradient with the same randomness as the cached run."""
    torch.manual_seed(seed)
    outs = [model(*mb) for mb in micro_batches]
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    scalars = {k: outs[0][k] for k in ("logit_scale", "logit_bias") if k in outs[0]}
    loss = loss_fn(**merged, **scalars)
    loss.backward()
    return loss.detach()


def cached(model, micro_batches, loss_fn, seed, **kwargs):
    torch.manual_seed(seed)
    return cached_backward(model, micro_batches, loss_fn, **kwargs)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(make_model, sizes, loss_fn=None, seed=0, tol=dict(rtol=1e-5), **kwargs):
    """Run reference and cached on identical copies; return both models for more checks."""
    loss_fn = loss_fn or ClipLoss()
    torch.manual_seed(1234)
    ref_model = make_model().train()
    our_model = make_model().train()
    our_model.load_state_dict(ref_model.state_dict())
    mbs = batches(sizes, seed=seed)
    ref_loss = reference_backward(ref_model, mbs, loss_fn, seed)
    our_loss = cached(our_model, mbs, loss_fn, seed, **kwargs)
    assert_close(our_loss, ref_loss, **FP32)
    ref_grads, our_grads = grads(ref_model), grads(our_model)
    assert ref_grads.keys() == our_grads.keys()
    assert "logit_scale" in our_grads
    for name in ref_grads:
        assert_grad_close(our_grads[name], ref_grads[name], name, **tol)
    return ref_model, our_model


def test_open_clip_vit_with_dropout_and_patch_dropout():
    compare(lambda: open_clip_vit(patch_dropout=0.5, dropout=0.2), [8, 8, 8, 8])


def test_timm_tower_with_drop_path():
    compare(lambda: timm_tower("convnext_atto", timm_drop_path=0.2), [6, 6, 6])


def test_siglip_scale_and_bias_learnable():
    _, model = compare(lambda: open_clip_vit(dropout=0.1, siglip=True), [8, 8, 8], SigLipLoss())
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0


def test_uneven_micro_batches():
    compare(lambda: open_clip_vit(patch_dropout=0.3, dropout=0.1), [8, 8, 5])


def test_batchnorm_grads_exact_and_running_stats_move_once():
    ref, ours = compare(lambda: timm_tower("resnet10t"), [8, 8, 8])
    ref_buffers = dict(ref.named_buffers())
    bn_buffers = [n for n in ref_buffers if "running_" in n or "num_batches" in n]
    assert bn_buffers
    for name, value in ours.named_buffers():
        assert_close(value, ref_buffers[name], **FP32, msg=lambda m, n=name: f"{n}: {m}")
    tracked = dict(ours.named_buffers())[next(n for n in bn_buffers if "num_batches" in n)]
    assert tracked.item() == 3  # once per micro-batch, not twice


def test_without_randomness_equals_one_forward_on_the_whole_batch():
    torch.manual_seed(0)
    ref_model, our_model = open_clip_vit(), open_clip_vit()
    our_model.load_state_dict(ref_model.state_dict())
    mbs = batches([6, 6, 6, 6])
    images, texts = (torch.cat(t) for t in zip(*mbs))
    ClipLoss()(**ref_model(images, texts)).backward()
    cached_backward(our_model, mbs, ClipLoss())
    for (name, p), q in zip(ref_model.named_parameters(), our_model.parameters()):
        assert_grad_close(q.grad, p.grad, name)


def test_bf16_autocast_close_to_reference():
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    loss_fn = ClipLoss()

    def ref_loss(**kw):
        with autocast():
            return loss_fn(**kw)

    torch.manual_seed(0)
    ref_model, our_model = open_clip_vit(dropout=0.1), open_clip_vit(dropout=0.1)
    our_model.load_state_dict(ref_model.state_dict())
    mbs = batches([8, 8, 8])
    with autocast():
        reference_backward(ref_model, mbs, ref_loss, seed=3)
    cached(our_model, mbs, loss_fn, seed=3, autocast=autocast)
    for (name, p), q in zip(ref_model.named_parameters(), our_model.parameters()):
        assert_grad_close(q.grad, p.grad, name, rtol=2e-2)


def test_grad_scaler_scales_every_gradient_once():
    torch.manual_seed(0)
    plain, scaled = open_clip_vit(), open_clip_vit()
    scaled.load_state_dict(plain.state_dict())
    mbs = batches([4, 4, 4])
    cached_backward(plain, mbs, ClipLoss())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cached_backward(scaled, mbs, ClipLoss(), grad_scaler=scaler)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert_close(q.grad / 1024.0, p.grad, **FP32)


def test_single_micro_batch_is_the_plain_step():
    torch.manual_seed(0)
    model = open_clip_vit()
    calls = []
    model.visual.register_forward_hook(lambda *_: calls.append(1))
    cached_backward(model, batches([8]), ClipLoss())
    assert len(calls) == 1
    assert all(p.grad is not None for p in model.parameters())


def test_forward_count_is_two_passes_less_the_kept_last():
    model = open_clip_vit()
    calls = []
    model.visual.register_forward_hook(lambda *_: calls.append(1))
    cached_backward(model, batches([4, 4, 4, 4]), ClipLoss())
    assert len(calls) == 4 + 3


def test_rng_continues_as_after_the_reference():
    model = open_clip_vit(dropout=0.3)
    mbs = batches([4, 4, 4])
    reference_backward(model, mbs, ClipLoss(), seed=7)
    expected = torch.rand(4)
    cached(model, mbs, ClipLoss(), seed=7)
    assert_close(torch.rand(4), expected)


def test_grads_accumulate_on_top_of_existing():
    torch.manual_seed(0)
    model = open_clip_vit()
    mbs = batches([4, 4])
    cached_backward(model, mbs, ClipLoss())
    once = grads(model)
    cached_backward(model, mbs, ClipLoss())
    for name, g in grads(model).items():
        assert_close(g, 2 * once[name], **FP32)


def test_frozen_tower_gets_no_grad_and_rest_stays_exact():
    def make():
        model = open_clip_vit(dropout=0.1)
        for p in model.visual.parameters():
            p.requires_grad_(False)
        return model
    _, model = compare(make, [4, 4, 4])
    assert all(p.grad is None for p in model.visual.parameters())


def test_mismatched_batch_sizes_in_outputs_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(4, 4)

        def forward(self, x):
            return {"image_features": self.w(x), "text_features": self.w(x[:1]),
                    "logit_scale": torch.ones(())}

    with pytest.raises(ValueError, match="disagree on the batch size"):
        cached_backward(Broken(), [(torch.randn(3, 4),), (torch.randn(3, 4),)], ClipLoss())


def test_grad_checkpointing_with_dropout_is_exact():
    """Checkpointed towers under cached accumulation vs the plain reference without it."""
    torch.manual_seed(1234)
    ref_model = open_clip_vit(patch_dropout=0.3, dropout=0.2).train()
    our_model = open_clip_vit(patch_dropout=0.3, dropout=0.2).train()
    our_model.load_state_dict(ref_model.state_dict())
    our_model.set_grad_checkpointing(True)
    mbs = batches([6, 6, 6])
    reference_backward(ref_model, mbs, ClipLoss(), seed=5)
    cached(our_model, mbs, ClipLoss(), seed=5)
    for (name, p), q in zip(ref_model.named_parameters(), our_model.parameters()):
        assert_grad_close(q.grad, p.grad, name)


def test_frozen_image_tower_runs_once_per_sample_and_stays_exact():
    """Locked image tower (no grad, eval mode): pass 2 recomputes only the text tower."""
    def make():
        model = open_clip_vit(dropout=0.2)
        model.visual.requires_grad_(False)
        return model

    torch.manual_seed(1234)
    ref_model, our_model = make().train(), make().train()
    our_model.load_state_dict(ref_model.state_dict())
    for m in (ref_model, our_model):
        m.visual.eval()
    calls = []
    our_model.visual.register_forward_hook(lambda *_: calls.append(1))
    mbs = batches([4, 4, 4])
    reference_backward(ref_model, mbs, ClipLoss(), seed=2)
    cached(our_model, mbs, ClipLoss(), seed=2, frozen_inputs=(0,))
    assert len(calls) == 3  # one forward per micro-batch: never recomputed
    for (name, p), q in zip(ref_model.named_parameters(), our_model.parameters()):
        if p.requires_grad:
            assert_grad_close(q.grad, p.grad, name)
        else:
            assert q.grad is None


def test_inputs_moved_right_before_each_forward_give_the_same_gradient():
    moves = []

    def to_device(inputs):  # stands in for pinned host -> GPU copies
        moves.append(len(inputs[0]))
        return tuple(t.clone() for t in inputs)

    ref, ours = compare(lambda: open_clip_vit(dropout=0.1), [4, 4, 3], to_device=to_device)
    assert moves == [4, 4, 3, 4, 4]  # pass 1 (all three), pass 2 (the two recomputed)


def peak_saved_bytes(step, model) -> int:
    """Peak bytes saved for backward while `step()` runs, the model's weights left out."""
    with MemoryMeter(storage_keys(model), track_live=False) as meter:
        step()
    return meter.saved.peak


def test_activation_memory_is_one_micro_batch_not_the_global_batch():
    torch.manual_seed(0)
    model = open_clip_vit()
    b, k = 16, 4
    one = peak_saved_bytes(lambda: cached_backward(model, batches([b]), ClipLoss()), model)
    whole = peak_saved_bytes(lambda: cached_backward(model, batches([b * k]), ClipLoss()), model)
    cached = peak_saved_bytes(lambda: cached_backward(model, batches([b] * k), ClipLoss()), model)
    assert whole > 3 * one  # activations grow with the batch...
    assert cached < 1.5 * one  # ...but the cached step holds one micro-batch's (+ a small loss)


@pytest.mark.parametrize("sizes", [[6, 6, 6], [6, 3], [9]], ids=str)
def test_coca_caption_loss_is_exact_and_its_logits_are_never_cached(sizes):
    """Contrastive + caption loss against the concatenated batch, the caption mean taken
    over all its tokens; no micro-batch's caption logits outlive its own backward."""
    contrastive, caption = ClipLoss(), CaptionLoss(weight=2.0)
    torch.manual_seed(1234)
    ref_model = open_clip_coca(dropout=0.1).train()
    our_model = open_clip_coca(dropout=0.1).train()
    our_model.load_state_dict(ref_model.state_dict())
    mbs = padded_batches(sizes)

    torch.manual_seed(0)
    outs = [ref_model(*mb) for mb in mbs]
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features", "logits", "labels")}
    ref_loss = contrastive(**merged, logit_scale=outs[0]["logit_scale"]) + caption(merged, caption.count(merged))
    ref_loss.backward()
    del outs, merged

    alive = []  # caption logits still alive at each forward of the cached run
    logits_refs = []

    def track(module, args, out):
        alive.append(sum(ref() is not None for ref in logits_refs))
        logits_refs.append(weakref.ref(out["logits"]))
    our_model.register_forward_hook(track)
    torch.manual_seed(0)
    our_loss = cached_backward(our_model, mbs, contrastive, sample_loss=caption)

    assert_close(our_loss, ref_loss.detach(), **FP32)
    ref_grads, our_grads = grads(ref_model), grads(our_model)
    assert ref_grads.keys() == our_grads.keys() and any(n.startswith("text_decoder") for n in our_grads)
    for name in ref_grads:
        assert_grad_close(our_grads[name], ref_grads[name], name)
    # pass 1 keeps no caption logits; pass 2 recomputes with only the last graph's alive
    assert max(alive) <= 1, alive


def test_sample_loss_with_a_frozen_tower_is_refused():
    with pytest.raises(ValueError, match="frozen_inputs"):
        cached_backward(open_clip_coca(), padded_batches([2, 2]), ClipLoss(), sample_loss=CaptionLoss(),
                        frozen_inputs=(0,))


@pytest.mark.parametrize("sizes", [[12], [6, 6], [5, 4, 3]], ids=str)
def test_distillation_is_exact_against_open_clips_objective_on_the_big_batch(sizes):
    """bigbatch's accumulated step (the teacher in pass 1 only) against open_clip's own
    DistillClipLoss, contrastive + distill terms, over the whole batch at once: the student's
    micro-batches run with grad under the same seed (same dropout masks), the teacher once
    on the concatenated batch."""
    torch.manual_seed(1234)
    ref_model = open_clip_vit(patch_dropout=0.3, dropout=0.1).train()
    our_model = open_clip_vit(patch_dropout=0.3, dropout=0.1).train()
    our_model.load_state_dict(ref_model.state_dict())
    teacher = Teacher(open_clip_teacher())
    mbs = batches(sizes)

    torch.manual_seed(0)
    outs = [ref_model(*mb) for mb in mbs]
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    images, texts = (torch.cat(t) for t in zip(*mbs))
    peer_terms = open_clip.loss.DistillClipLoss()(**merged, logit_scale=outs[0]["logit_scale"],
                                                  **teacher(images, texts), output_dict=True)
    ref_loss = sum(peer_terms.values())
    ref_loss.backward()

    teacher_calls = []
    teacher.model.visual.register_forward_hook(lambda *_: teacher_calls.append(1))
    loss_fn = DistillClipLoss()
    our_loss = cached(our_model, mbs, loss_fn, seed=0, teacher=teacher)

    assert len(teacher_calls) == len(sizes)  # once per sample, never in pass 2
    assert_close(our_loss, ref_loss.detach(), **FP32)
    assert loss_fn.terms.keys() == peer_terms.keys()
    for name, term in peer_terms.items():
        assert_close(loss_fn.terms[name], term.detach(), **FP32)
    assert peer_terms["distill_loss"] > 0
    ref_grads, our_grads = grads(ref_model), grads(our_model)
    assert ref_grads.keys() == our_grads.keys() and "logit_scale" in our_grads
    for name in ref_grads:
        assert_grad_close(our_grads[name], ref_grads[name], name)
    assert all(p.grad is None for p in teacher.model.parameters())


def test_teacher_outputs_that_clash_with_the_models_are_refused():
    with pytest.raises(ValueError, match="clash"):
        cached_backward(open_clip_vit(), batches([2, 2]), ClipLoss(),
                        teacher=lambda images, texts: {"image_features": images})
