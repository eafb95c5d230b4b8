"""Evaluation: retrieval recall@k, zero-shot classification, and one validation pass.

Ranks are pessimistic about ties: the rank of the true match is the number of *other*
candidates that score at least as high. A collapsed model (all scores equal) therefore
gets no credit, instead of the perfect score that "number of strictly higher scores"
would hand it. NaN scores count against the query for the same reason.

Large sets are scored in row chunks, so nothing bigger than (chunk_size, N) is built:
50k image-text pairs need 50k x 1024 floats at a time, never 50k x 50k.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch.distributed import gather_objects

log = logging.getLogger(__name__)

Template = str | Callable[[str], str]
AutocastFactory = Callable[[], contextlib.AbstractContextManager]


# --------------------------------------------------------------------------- ranking


def _true_ranks(queries: Tensor, keys: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """0-based rank of each query's true key among all keys, ties counted against it.

    queries (N, D), keys (M, D), targets (N,) indices into keys -> ranks (N,) long.
    """
    ranks = []
    for start in range(0, len(queries), chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T  # (c, M)
        # the true score comes from the same product, so exact ties stay bit-exact
        true = scores[torch.arange(len(scores)), targets[start : start + chunk_size]]  # (c,)
        # "not lower" = ">=" plus NaN; the -1 removes the true key itself
        ranks.append((scores < true[:, None]).logical_not().sum(1) - 1)
    return torch.cat(ranks)


def recall_at_k(
    image_features: Tensor,
    text_features: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k over N pairs where pair i matches i.

    image_features, text_features: (N, D), L2-normalized. Returns
    `image_to_text_R@k`, `text_to_image_R@k` for each k, `mean_recall` (their mean),
    and open_clip_train's `*_mean_rank` / `*_median_rank` (1-based).
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    images, texts = image_features.float(), text_features.float()
    targets = torch.arange(len(images), device=images.device)
    recalls, ranks_summary = {}, {}
    for name, queries, keys in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        ranks = _true_ranks(queries, keys, targets, chunk_size)
        for k in ks:
            recalls[f"{name}_R@{k}"] = (ranks < k).float().mean().item()
        ranks_summary[f"{name}_mean_rank"] = ranks.float().mean().item() + 1
        ranks_summary[f"{name}_median_rank"] = float(ranks.median().item() + 1)
    return {**recalls, "mean_recall": sum(recalls.values()) / len(recalls), **ranks_summary}


# --------------------------------------------------------------------------- zero-shot


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; afterwards every submodule gets its own mode back
    (a locked tower may deliberately sit in eval mode inside a training model)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _fill(template: Template, classname: str) -> str:
    return template.format(classname) if isinstance(template, str) else template(classname)


@torch.no_grad()
def build_zeroshot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: str | torch.device = "cpu",
    autocast: AutocastFactory = contextlib.nullcontext,
    classes_per_batch: int = 32,
) -> Tensor:
    """Zero-shot weights (D, C): per class, the renormalized mean of its normalized
    template embeddings. Templates are "{}" format strings or callables."""
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    columns = []
    with eval_mode(model):
        # a few classes per forward: all of ImageNet's 1000 x 80 prompts at once would not fit
        for start in range(0, len(classnames), classes_per_batch):
            names = classnames[start : start + classes_per_batch]
            tokens = tokenizer([_fill(t, c) for c in names for t in templates]).to(device)
            with autocast():
                embeddings = model.encode_text(tokens, normalize=True)  # (c * T, D)
            embeddings = embeddings.float().reshape(len(names), len(templates), -1).mean(1)  # (c, D)
            columns.append(F.normalize(embeddings, dim=-1))
    return torch.cat(columns).T.contiguous()  # (D, C)


def zeroshot_accuracy(
    image_features: Tensor,
    labels: Tensor,
    classifier: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
) -> dict[str, float | list[float]]:
    """Top-k accuracy of `image_features @ classifier` against `labels`.

    image_features (N, D), labels (N,), classifier (D, C). Returns `zeroshot_top{k}` for
    each k <= C, `zeroshot_per_class` (C top-1 accuracies; NaN for classes without
    samples) and `zeroshot_mean_per_class` (their mean over classes present).
    """
    features = image_features.float()
    classifier = classifier.to(features.device, torch.float32)
    labels = torch.as_tensor(labels, device=features.device).long()
    num_classes = classifier.shape[1]
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} class names, "
            f"got [{labels.min().item()}, {labels.max().item()}]; check the classnames file"
        )
    return _accuracy(_true_ranks(features, classifier.T, labels, chunk_size), labels, num_classes, ks)


def _accuracy(ranks: Tensor, labels: Tensor, num_classes: int, ks: Sequence[int] = (1, 5)) -> dict:
    """zeroshot_accuracy's metrics from each image's rank (N,) of its true class."""
    metrics: dict[str, float | list[float]] = {
        f"zeroshot_top{k}": (ranks < k).float().mean().item() for k in ks if k <= num_classes
    }
    hits = torch.zeros(num_classes, device=ranks.device).index_add_(0, labels, (ranks == 0).float())
    per_class = hits / torch.bincount(labels, minlength=num_classes)  # 0 / 0 = NaN: class absent
    metrics["zeroshot_mean_per_class"] = per_class.nanmean().item()
    metrics["zeroshot_per_class"] = per_class.tolist()
    return metrics


def zeroshot_classification(
    model: nn.Module,
    batches: Iterable,
    classifier: Tensor,
    *,
    device: str | torch.device = "cpu",
    autocast: AutocastFactory = contextlib.nullcontext,
    across_ranks: bool = False,
) -> dict:
    """Zero-shot accuracy of the labelled images of `batches` against `classifier` (D, C)
    (`build_zeroshot_classifier`); the texts of the batches, if any, are not embedded.

    Batches are read as in `evaluate` (labels at index 2). Returns `zeroshot_accuracy`'s
    metrics, `num_samples`, `zeroshot_class_samples` (images per class) and `skipped`. across_ranks: `batches` are this rank's share;
    only each image's rank of its true class is gathered, never the features.
    """
    device = torch.device(device)
    num_classes = classifier.shape[1]
    with eval_mode(model), torch.no_grad(), _failing_together(across_ranks):
        images, _, label_chunks, _, skipped = _embed_batches(model, batches, None, device, autocast, texts=False)
        if any(labels is None for labels in label_chunks):
            raise ValueError("has samples without a class label: webdataset shards need a .cls file per "
                             "sample, a CSV an integer class column named by --csv-label-key")
        labels = torch.cat([torch.as_tensor(labels).long() for labels in label_chunks] or [torch.zeros(0).long()])
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels.max().item() if labels.max() >= num_classes else labels.min().item()
            raise ValueError(f"has label {bad} but there are only {num_classes} class names: "
                             "labels count from 0 in the order of the class names")
        ranks = torch.zeros(0, dtype=torch.long)  # a rank without images
        if images:
            classes = classifier.to(device, torch.float32).T  # (C, D)
            ranks = _true_ranks(torch.cat(images).to(device), classes, labels.to(device), 1024).cpu()
    if across_ranks:
        every = gather_objects((ranks, labels, skipped))
        ranks, labels = torch.cat([r for r, _, _ in every]), torch.cat([l for _, l, _ in every])
        skipped = sum((s for _, _, s in every), Counter())
    if not len(labels):
        raise ValueError("gave no images: check the data")
    return {"num_samples": len(labels), **_accuracy(ranks, labels, num_classes),
            "zeroshot_class_samples": torch.bincount(labels, minlength=num_classes).tolist(),
            "skipped": dict(skipped)}


# --------------------------------------------------------------------------- validation pass


def _forward(model: nn.Module, images: Tensor, texts: Tensor) -> dict[str, Tensor]:
    out = model(images, texts)
    if isinstance(out, dict):
        return out
    # open_clip models built without output_dict=True return a tuple in this order
    return dict(zip(("image_features", "text_features", "logit_scale", "logit_bias"), out))


def _batch_loss(loss_fn: Callable[..., Tensor], out: dict[str, Tensor]) -> float:
    kwargs = {"logit_bias": out["logit_bias"]} if out.get("logit_bias") is not None else {}
    loss = loss_fn(
        image_features=out["image_features"],
        text_features=out["text_features"],
        logit_scale=out["logit_scale"],
        **kwargs,
    )
    return loss.item()


def evaluate(
    model: nn.Module,
    batches: Iterable,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    tokenizer: Callable[[list[str]], Tensor] | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] | None = None,
    device: str | torch.device = "cpu",
    autocast: AutocastFactory = contextlib.nullcontext,
    across_ranks: bool = False,
) -> dict:
    """One no-grad pass over `batches` in eval mode; the model's modes are restored after.

    Each batch is (images (B,3,H,W), texts (B,L)[, labels (B,) or None[, skipped dict]]),
    read by index so NamedTuples and plain tuples both work. Returns a flat dict:
    `num_samples`; `val_loss` if `loss_fn` is given (the per-batch loss averaged over
    samples, as open_clip_train reports it); retrieval recall over the whole set; zero-shot
    metrics over the samples with a class id (labels -1: none) if `classnames` is given; and `skipped`, the
    batches' skip counters summed.

    across_ranks: `batches` are this rank's share of the set (torch.distributed is
    initialised); the features, labels, losses and skip counts of every rank are gathered,
    once, and every rank returns the metrics of the whole set.
    """
    if classnames is not None and (tokenizer is None or not templates):
        raise ValueError("zero-shot evaluation needs classnames, templates and a tokenizer: pass all three")
    device = torch.device(device)
    with eval_mode(model), torch.no_grad():
        with _failing_together(across_ranks):
            parts = _embed_batches(model, batches, loss_fn, device, autocast)
        if across_ranks:
            parts = _gather_from_ranks(*parts)
        image_chunks, text_chunks, label_chunks, loss_sum, skipped = parts
        if not image_chunks:
            raise ValueError("evaluate got no batches: is the validation data empty?")
        # scoring runs on the device (fast), still chunked; the features are only (N, D)
        image_features = torch.cat(image_chunks).to(device)  # (N, D)
        text_features = torch.cat(text_chunks).to(device)  # (N, D)
        num_samples = len(image_features)
        metrics: dict = {"num_samples": num_samples}
        if loss_fn is not None:
            metrics["val_loss"] = loss_sum / num_samples
        metrics.update(recall_at_k(image_features, text_features))

        if classnames is not None:
            labels = _class_ids(label_chunks, image_chunks)
            labelled = labels >= 0
            if not labelled.any():
                log.warning("zero-shot skipped: the evaluation samples carry no class ids")
            else:
                if not labelled.all():
                    log.warning(f"zero-shot over the {int(labelled.sum())} of {num_samples} samples "
                                f"that have a class id")
                classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates, device, autocast)
                metrics.update(zeroshot_accuracy(image_features[labelled.to(device)], labels[labelled], classifier))
    metrics["skipped"] = dict(skipped)
    return metrics


def _class_ids(label_chunks: list, image_chunks: list) -> Tensor:
    """Every sample's class id, -1 where it has none (a batch without labels: all -1)."""
    return torch.cat([torch.full((len(images),), -1, dtype=torch.long) if labels is None
                      else torch.as_tensor(labels).long() for labels, images in zip(label_chunks, image_chunks)])


def _embed_batches(model: nn.Module, batches: Iterable, loss_fn: Callable[..., Tensor] | None,
                   device: torch.device, autocast: AutocastFactory, texts: bool = True) -> tuple:
    """Per batch: image and (unless `texts` is False) text features, on the host in fp32
    (the device only ever holds one batch), and labels; the summed per-batch loss x batch
    size; the skip counts."""
    image_chunks, text_chunks, label_chunks = [], [], []
    loss_sum, skipped = 0.0, Counter()
    for batch in batches:
        images = batch[0].to(device=device, non_blocking=True)  # uint8: the model normalises
        with autocast():
            if texts:
                out = _forward(model, images, batch[1].to(device=device, non_blocking=True))
            else:
                out = {"image_features": model.encode_image(images, normalize=True)}
            if loss_fn is not None:
                loss_sum += _batch_loss(loss_fn, out) * len(images)
        image_chunks.append(out["image_features"].float().cpu())  # (B, D)
        if texts:
            text_chunks.append(out["text_features"].float().cpu())  # (B, D)
        label_chunks.append(batch[2] if len(batch) > 2 else None)
        if len(batch) > 3 and batch[3]:
            skipped.update(batch[3])
    return image_chunks, text_chunks, label_chunks, loss_sum, skipped


@contextlib.contextmanager
def _failing_together(across_ranks: bool) -> Iterator[None]:
    """Across ranks, an error on one (its shards are unreadable, say) is raised on every
    rank, instead of leaving the others waiting in the gather until a timeout."""
    if not across_ranks:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # re-raised below, on every rank
        error = exc
    first = next((e for e in gather_objects(error) if e is not None), None)
    if first is not None:
        raise first


def _gather_from_ranks(image_chunks: list, text_chunks: list, label_chunks: list,
                       loss_sum: float, skipped: Counter) -> tuple:
    """Every rank's host-side results, rank-major (one all_gather_object; a rank with no
    batches contributes empty lists)."""
    images, texts, labels, loss, skips = [], [], [], 0.0, Counter()
    every = gather_objects((image_chunks, text_chunks, label_chunks, loss_sum, skipped))
    for rank_images, rank_texts, rank_labels, rank_loss, rank_skips in every:
        images += rank_images
        texts += rank_texts
        labels += rank_labels
        loss += rank_loss
        skips.update(rank_skips)
    return images, texts, labels, loss, skips


# --------------------------------------------------------------------------- I/O helpers


def load_lines(path: str | Path) -> list[str]:
    """Class names or templates from a text file: one per line, stripped; blank lines
    and lines starting with "#" are skipped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path} has no entries: write one per line (blank lines and # comments are skipped)")
    return lines


def _numbered(metrics: dict, pattern: str) -> list[tuple[int, float]]:
    """(k, value) for every key that fully matches `pattern` with one (\\d+) group, by k."""
    found = [(int(m.group(1)), v) for key, v in metrics.items() if (m := re.fullmatch(pattern, key))]
    return sorted(found)


def format_metrics(metrics: dict) -> str:
    """One-line summary, e.g.
    `val_loss 1.2340 | zero-shot top1 81.2% top5 99.0% | i->t R@1/5/10 40.1/80.0/90.2 | ...`."""
    parts = []
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    top = _numbered(metrics, r"zeroshot_top(\d+)")
    if top:
        parts.append("zero-shot " + " ".join(f"top{k} {100 * v:.1f}%" for k, v in top))
    for name, short in (("image_to_text", "i->t"), ("text_to_image", "t->i")):
        recalls = _numbered(metrics, rf"{name}_R@(\d+)")
        if recalls:
            ks = "/".join(str(k) for k, _ in recalls)
            parts.append(f"{short} R@{ks} " + "/".join(f"{100 * v:.1f}" for _, v in recalls))
    if "mean_recall" in metrics:
        parts.append(f"mean recall {100 * metrics['mean_recall']:.1f}")
    if "num_samples" in metrics:
        parts.append(f"n={metrics['num_samples']}")
    if metrics.get("skipped"):
        parts.append("skipped " + ", ".join(f"{k} {v}" for k, v in sorted(metrics["skipped"].items())))
    return " | ".join(parts)
