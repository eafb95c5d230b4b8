"""Evaluation metrics against hand-computed values and a tiny open_clip model."""

import math
from typing import NamedTuple

import open_clip
import pytest
import torch
import torch.nn.functional as F

from bigbatch.evaluate import (
    build_zeroshot_classifier,
    evaluate,
    format_metrics,
    load_lines,
    recall_at_k,
    zeroshot_accuracy,
)

A = 1 / math.sqrt(2)

# Rows are images, columns texts; texts are one-hot so image @ text.T is exactly this.
#   i->t ranks (ties count against): 0, 1 (0.8 beats 0.6), 1 (tie), 3 (all tie)
#   t->i ranks per column:           0, 0, 1 (0.8 beats A), 1 (A beats 0.5)
SCORES = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.6, 0.8, 0.0],
        [0.0, 0.0, A, A],
        [0.5, 0.5, 0.5, 0.5],
    ]
)


def test_recall_by_hand_with_ties():
    metrics = recall_at_k(SCORES, torch.eye(4), ks=(1, 2, 5))
    expected = {
        "image_to_text_R@1": 0.25,  # "strictly higher" ranks would give 0.75 here
        "image_to_text_R@2": 0.75,
        "image_to_text_R@5": 1.0,
        "text_to_image_R@1": 0.5,
        "text_to_image_R@2": 1.0,
        "text_to_image_R@5": 1.0,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["mean_recall"] == pytest.approx(sum(expected.values()) / 6)
    assert metrics["image_to_text_mean_rank"] == pytest.approx(1 + (0 + 1 + 1 + 3) / 4)


def test_recall_default_keys_and_chunking():
    metrics = recall_at_k(SCORES, torch.eye(4))
    assert {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} <= metrics.keys()
    for chunk_size in (1, 3):
        assert recall_at_k(SCORES, torch.eye(4), chunk_size=chunk_size) == metrics


def test_recall_collapsed_model_gets_no_credit():
    same = F.normalize(torch.ones(6, 8), dim=-1)
    metrics = recall_at_k(same, same, ks=(1, 5))
    assert metrics["image_to_text_R@1"] == 0.0
    assert metrics["text_to_image_R@5"] == 0.0


def test_recall_matches_argsort_reference_without_ties():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(50, 16), dim=-1), F.normalize(torch.randn(50, 16), dim=-1)
    metrics = recall_at_k(images, texts, ks=(1, 5, 10), chunk_size=7)
    for name, scores in (("image_to_text", images @ texts.T), ("text_to_image", texts @ images.T)):
        ranks = (scores.argsort(dim=1, descending=True) == torch.arange(50)[:, None]).nonzero()[:, 1]
        for k in (1, 5, 10):
            assert metrics[f"{name}_R@{k}"] == pytest.approx((ranks < k).float().mean().item())


def test_zeroshot_accuracy_by_hand():
    # classifier = identity, so each image row is its class scores
    features = torch.tensor(
        [
            [1.0, 0, 0, 0, 0, 0],  # label 0: rank 0
            [0.8, 0.6, 0, 0, 0, 0],  # label 1: rank 1
            [0, 0, 1.0, 1.0, 0, 0],  # label 2: tie, rank 1
            [1.0, 1.0, 0.1, 1.0, 1.0, 1.0],  # label 2: rank 5
        ]
    )
    metrics = zeroshot_accuracy(features, torch.tensor([0, 1, 2, 2]), torch.eye(6))
    assert metrics["zeroshot_top1"] == pytest.approx(0.25)
    assert metrics["zeroshot_top5"] == pytest.approx(0.75)
    per_class = metrics["zeroshot_per_class"]
    assert per_class[:3] == [1.0, 0.0, 0.0]
    assert all(math.isnan(v) for v in per_class[3:])
    assert metrics["zeroshot_mean_per_class"] == pytest.approx(1 / 3)


def test_zeroshot_top5_omitted_below_five_classes_and_bad_labels_rejected():
    features = torch.eye(3)
    metrics = zeroshot_accuracy(features, torch.tensor([0, 1, 1]), torch.eye(3))
    assert "zeroshot_top5" not in metrics
    assert metrics["zeroshot_top1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        zeroshot_accuracy(features, torch.tensor([0, 1, 3]), torch.eye(3))


# --------------------------------------------------------------------------- tiny model


def tiny_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        # patch dropout is active only in train mode: evaluating in train mode would show
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2, patch_dropout=0.5),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
        output_dict=True,
    )


def tokenize(texts: list[str]) -> torch.Tensor:
    """Characters to ids in [1, 998], EOT 999 (the largest id, so argmax pooling finds it)."""
    tokens = torch.zeros(len(texts), 16, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [1 + ord(ch) % 998 for ch in text[:15]] + [999]
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


class Batch(NamedTuple):
    images: torch.Tensor
    texts: torch.Tensor
    labels: torch.Tensor | None
    skipped: dict[str, int]


CLASSNAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a {}"]


def make_batches(sizes=(4, 4, 3)) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    return [
        Batch(
            images=torch.randn(n, 3, 32, 32, generator=gen),
            texts=torch.randint(1, 999, (n, 16), generator=gen),
            labels=torch.randint(0, 3, (n,), generator=gen),
            skipped={"corrupt": i, "too_long": 1},
        )
        for i, n in enumerate(sizes)
    ]


def test_build_zeroshot_classifier_shape_and_mean_of_templates():
    model = tiny_clip()
    classifier = build_zeroshot_classifier(model, tokenize, ["cat", "dog", "cat"], TEMPLATES, classes_per_batch=2)
    assert classifier.shape == (32, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    torch.testing.assert_close(classifier[:, 0], classifier[:, 2])  # same name, across class batches
    assert not torch.allclose(classifier[:, 0], classifier[:, 1])

    model.eval()
    with torch.no_grad():
        dog = model.encode_text(tokenize([t.format("dog") for t in TEMPLATES]), normalize=True).mean(0)
    torch.testing.assert_close(classifier[:, 1], F.normalize(dog, dim=0))


def test_build_zeroshot_classifier_accepts_callables():
    model = tiny_clip()
    from_strings = build_zeroshot_classifier(model, tokenize, CLASSNAMES, TEMPLATES)
    callables = [lambda c: f"a photo of a {c}.", lambda c: f"a {c}"]
    torch.testing.assert_close(build_zeroshot_classifier(model, tokenize, CLASSNAMES, callables), from_strings)


def test_evaluate_tiny_model():
    model = tiny_clip()
    model.train()
    model.transformer.eval()  # a submodule kept in eval (like a locked tower) must stay so
    batches = make_batches()
    loss_fn = open_clip.ClipLoss()

    metrics = evaluate(
        model, batches, loss_fn=loss_fn, tokenizer=tokenize, classnames=CLASSNAMES, templates=TEMPLATES
    )

    assert model.training and model.visual.training and not model.transformer.training
    # reference: the same pass by hand, in eval mode
    model.eval()
    with torch.no_grad():
        outs = [model(b.images, b.texts) for b in batches]
    losses = [loss_fn(o["image_features"], o["text_features"], o["logit_scale"]).item() for o in outs]
    sizes = [len(b.images) for b in batches]
    assert metrics["val_loss"] == pytest.approx(sum(l * n for l, n in zip(losses, sizes)) / sum(sizes), rel=1e-6)
    assert metrics["num_samples"] == 11
    assert metrics["skipped"] == {"corrupt": 3, "too_long": 3}

    images = torch.cat([o["image_features"] for o in outs])
    texts = torch.cat([o["text_features"] for o in outs])
    for key, value in recall_at_k(images, texts).items():
        assert metrics[key] == pytest.approx(value), key
    classifier = build_zeroshot_classifier(model, tokenize, CLASSNAMES, TEMPLATES)
    expected = zeroshot_accuracy(images, torch.cat([b.labels for b in batches]), classifier)
    assert metrics["zeroshot_top1"] == pytest.approx(expected["zeroshot_top1"])
    assert "zeroshot_top5" not in metrics  # only 3 classes
    assert len(metrics["zeroshot_per_class"]) == 3


def test_zeroshot_over_the_samples_with_a_class_id(caplog):
    """Validation data where some samples have no class id (-1 in a batch, or a batch with
    none): retrieval over all, zero-shot over the labelled ones, said."""
    model = tiny_clip().eval()
    batches = make_batches((4, 4, 3))
    batches[0].labels[1] = -1
    batches[2] = batches[2]._replace(labels=None)
    metrics = evaluate(model, batches, tokenizer=tokenize, classnames=CLASSNAMES, templates=TEMPLATES)
    with torch.no_grad():
        images = torch.cat([model(b.images, b.texts)["image_features"] for b in batches])
    classifier = build_zeroshot_classifier(model, tokenize, CLASSNAMES, TEMPLATES)
    keep = [0, 2, 3, 4, 5, 6, 7]
    expected = zeroshot_accuracy(images[keep], torch.cat([batches[0].labels, batches[1].labels])[keep], classifier)
    assert metrics["num_samples"] == 11
    assert metrics["zeroshot_top1"] == pytest.approx(expected["zeroshot_top1"])
    assert metrics["zeroshot_mean_per_class"] == pytest.approx(expected["zeroshot_mean_per_class"])
    assert "zero-shot over the 7 of 11 samples that have a class id" in caplog.text


def test_evaluate_plain_tuples_without_labels_keeps_eval_mode():
    model = tiny_clip().eval()
    batches = [(b.images, b.texts) for b in make_batches((5, 2))]
    metrics = evaluate(model, batches, tokenizer=tokenize, classnames=CLASSNAMES, templates=TEMPLATES)
    assert not model.training
    assert metrics["num_samples"] == 7 and metrics["skipped"] == {}
    assert "val_loss" not in metrics and "zeroshot_top1" not in metrics
    assert 0.0 <= metrics["image_to_text_R@1"] <= 1.0


def test_evaluate_rejects_zeroshot_without_tokenizer_and_empty_data():
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(tiny_clip(), make_batches(), classnames=CLASSNAMES, templates=TEMPLATES)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(tiny_clip(), [])


def test_load_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# ImageNet subset\n  tench \n\ngoldfish\n# end\na photo of a #{}\n", encoding="utf-8")
    assert load_lines(path) == ["tench", "goldfish", "a photo of a #{}"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no entries"):
        load_lines(tmp_path / "empty.txt")


def test_format_metrics():
    metrics = {
        "val_loss": 1.23456,
        "zeroshot_top1": 0.812,
        "zeroshot_top5": 0.99,
        "image_to_text_R@1": 0.401,
        "image_to_text_R@5": 0.8,
        "image_to_text_R@10": 0.902,
        "text_to_image_R@1": 0.3,
        "text_to_image_R@5": 0.7,
        "text_to_image_R@10": 0.85,
        "mean_recall": 0.6588,
        "num_samples": 100,
        "skipped": {"corrupt": 2},
    }
    line = format_metrics(metrics)
    assert "val_loss 1.2346" in line
    assert "zero-shot top1 81.2% top5 99.0%" in line
    assert "i->t R@1/5/10 40.1/80.0/90.2" in line
    assert "t->i R@1/5/10 30.0/70.0/85.0" in line
    assert "skipped corrupt 2" in line
    assert format_metrics({"val_loss": 2.0}) == "val_loss 2.0000"
