"""Zero-shot ImageNet as open_clip_train reports it (--imagenet-val, --imagenet-v2).

Each flag names an ImageFolder tree, one folder per class. Class k is ImageNet-1k's k-th:
either the 1000 synset folders (n01440764, ...) in sorted order, as torchvision's
ImageFolder numbers them, or ImageNetV2's folders `0`..`999` read as numbers (sorted as
text they would be 0, 1, 10, 100, ...: wrong labels). The classifier is built from the
built-in class names and the 80 OpenAI templates; top-1/top-5 go out under the peer's
names, `imagenet-zeroshot-val-top1` and `imagenetv2-zeroshot-val-top1` (and top5).
Each rank scores every world-size-th image (`evaluate.zeroshot_classification` gathers the
results). Training (`--imagenet-val`) and `bigbatch eval` (the same flags) both call
`imagenet_zeroshot`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bigbatch.data import Batch
from bigbatch.errors import ConfigError
from bigbatch.evaluate import build_zeroshot_classifier, zeroshot_classification
from bigbatch.zeroshot import builtin_classnames, builtin_templates

METRIC_PREFIX = {"imagenet_val": "imagenet-zeroshot-val", "imagenet_v2": "imagenetv2-zeroshot-val"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpeg", ".tif", ".tiff")
NUM_CLASSES = 1000
TEMPLATES = "openai"  # the peer's OPENAI_IMAGENET_TEMPLATES


class ClassFolders(Dataset):
    """(image, ImageNet class index) from a tree of class folders (see the module docstring)."""

    def __init__(self, root: str | Path, transform, flag: str = "--imagenet-val"):
        folders = sorted((entry for entry in os.scandir(root) if entry.is_dir()), key=lambda e: e.name)
        names = [folder.name for folder in folders]
        if names and all(name.isdigit() for name in names):
            labels = [int(name) for name in names]
        elif len(names) == NUM_CLASSES:
            labels = list(range(NUM_CLASSES))
        else:
            labels = []
        if not labels or max(labels) >= NUM_CLASSES:
            raise ConfigError(f"{flag} {root}: expected ImageNet's {NUM_CLASSES} synset folders "
                              f"(or folders 0..999), found {len(names)} folders: give the "
                              f"ImageFolder tree of the whole set")
        self.samples = [(os.path.join(folder.path, file), label)
                        for folder, label in zip(folders, labels)
                        for file in sorted(os.listdir(folder.path))
                        if file.lower().endswith(IMAGE_SUFFIXES)]
        if not self.samples:
            raise ConfigError(f"{flag} {root}: no images in its class folders")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def open_trees(roots: dict[str, str | None], preprocess) -> dict[str, ClassFolders]:
    """The trees given ({"imagenet_val": DIR, "imagenet_v2": None}), read (and checked) now,
    not after the first epoch."""
    return {key: ClassFolders(root, preprocess, f"--{key.replace('_', '-')}")
            for key, root in roots.items() if root}


def imagenet_zeroshot(model, datasets: dict[str, ClassFolders], tokenizer, *, device: torch.device,
                      autocast=contextlib.nullcontext, batch_size: int = 64, workers: int = 0,
                      rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy on each tree of `open_trees`, under the peer's names."""
    if not datasets:
        return {}
    classifier = build_zeroshot_classifier(model, tokenizer, builtin_classnames("imagenet"),
                                           builtin_templates(TEMPLATES), device, autocast)  # (D, 1000)
    metrics = {}
    for key, dataset in datasets.items():
        mine = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
        loader = DataLoader(mine, batch_size, num_workers=workers, collate_fn=_collate)
        scores = zeroshot_classification(model, loader, classifier, device=device, autocast=autocast,
                                         across_ranks=world_size > 1)
        metrics[f"{METRIC_PREFIX[key]}-top1"] = scores["zeroshot_top1"]
        metrics[f"{METRIC_PREFIX[key]}-top5"] = scores["zeroshot_top5"]
    return metrics


def _collate(items: list[tuple[torch.Tensor, int]]) -> Batch:
    images, labels = zip(*items)
    return Batch(torch.stack(images), None, torch.tensor(labels), {})
