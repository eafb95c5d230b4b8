"""What the user asked for (``DataSpec``) and what they get back (``DataInfo``)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

from .batch import Batch

DATASET_TYPES = ("webdataset", "csv", "synthetic", "auto")


@dataclass
class DataSpec:
    """One data source, as the CLI flags describe it."""

    paths: str
    """--train-data / --val-data: brace patterns allowed, several sources joined by '::'."""
    dataset_type: str
    """"webdataset", "csv", "synthetic", or "auto" (.tar -> webdataset, .csv/.tsv -> csv)."""
    batch_size: int
    """Micro-batch size per rank."""
    num_samples: int | None = None
    """Samples per epoch over all ranks; by default the size of the data (sizes.json for shards)."""
    resampled: bool = False
    """--dataset-resampled: draw shards with replacement (webdataset only)."""
    upsampling_factors: str | None = None
    """--train-data-upsampling-factors: with ``resampled``, how often each '::'-joined
    source's shards are drawn ('1::2'); None draws every shard alike."""
    workers: int = 1
    """DataLoader worker processes per rank (0: load in the main process)."""
    step_batches: int = 1
    """Batches one optimizer step takes (--accum-freq): the workers keep them in flight."""
    seed: int = 0
    """Shuffles are a function of (seed, epoch) only, identical across runs and restarts."""
    is_train: bool = True
    """Train: shuffle, repeat to fill the epoch. Val: read everything once, in order."""
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    captions: bool = True
    """False: samples need no caption (zero-shot images with labels); their texts are empty."""
    csv_separator: str = "\t"
    csv_label_key: str | None = None
    """Optional integer class-id column (zero-shot evaluation on a CSV)."""
    rank: int = 0
    world_size: int = 1
    flag: str = ""
    """The flag that named ``paths``, for messages (default: --train-data / --val-data)."""
    num_samples_flag: str = ""
    """The flag of ``num_samples`` (default: --train-num-samples / --val-num-samples)."""

    def prefetch_factor(self, workers: int) -> int | None:
        """Batches in flight per worker, for `workers` loader processes (None for 0): a whole
        step's, plus the one the Loader holds back (see loader.py), so that pass 1 does not
        wait while a worker decodes its last micro-batches; at least the DataLoader's 2 and
        at most 4, which bounds the host's shared memory."""
        if workers == 0:
            return None
        return min(4, max(2, -(-(self.step_batches + 1) // workers)))

    def __post_init__(self):
        self.flag = self.flag or ("--train-data" if self.is_train else "--val-data")
        self.num_samples_flag = self.num_samples_flag or ("--train-num-samples" if self.is_train
                                                          else "--val-num-samples")


@dataclass
class DataInfo:
    """A loader and the epoch arithmetic the train loop needs."""

    loader: Iterable[Batch]
    """Yields ``Batch``es; ``len(loader)`` is ``num_batches`` when known."""
    num_samples: int | None
    """Samples per epoch over all ranks (None only for val sets of unknown size)."""
    num_batches: int | None
    """Micro-batches per epoch on this rank (the same on every rank when training)."""
    epoch_hook: Callable[[int, int], None] | None = field(default=None, repr=False)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the shuffle of the next pass over ``loader``; call before iterating.
        ``skip_batches``: this rank's first batches of the epoch are left out (a run resumed
        from a mid-epoch checkpoint); the rest are exactly those of an uninterrupted run."""
        if self.epoch_hook is not None:
            self.epoch_hook(epoch, skip_batches)


def expand_paths(paths: str) -> list[str]:
    """Expand brace patterns in each '::'-joined source and concatenate, in order."""
    expanded = []
    for source in paths.split("::"):
        source = source.strip()
        if source:
            expanded.extend(os.path.expanduser(p) for p in braceexpand.braceexpand(source))
    return expanded


def shard_weights(paths: str, factors: str | None) -> list[float] | None:
    """Each shard's drawing weight, in ``expand_paths`` order: its source's factor."""
    if factors is None:
        return None
    sources = [s for s in paths.split("::") if s.strip()]
    return [float(factor) for source, factor in zip(sources, factors.split("::"))
            for _ in expand_paths(source)]


TAR_EXTENSIONS = (".tar", ".tgz", ".tar.gz")


def local_path(path: str) -> str | None:
    """The file a shard path names on this machine (a plain path, or a file:// URL's
    path); None for a ``pipe:`` command or a remote URL."""
    if path.startswith("file://"):
        return url2pathname(urlparse(path).path)
    return None if "://" in path or path.startswith("pipe:") else path


def is_local(path: str) -> bool:
    """Whether a shard path is a file on this machine (not a remote URL or a ``pipe:`` command)."""
    return local_path(path) is not None


def location(path: str) -> str:
    """Where the shard lies: for ``pipe:CMD`` the command's argument that names a tar file
    (``pipe:cat /data/0.tar``, ``pipe:aws s3 cp s3://b/0.tar -``), else the path or URL itself.
    Its extension says the data type; a sizes.json beside it gives its sample count."""
    if not path.startswith("pipe:"):
        return path
    try:
        words = shlex.split(path[len("pipe:"):])
    except ValueError:
        words = path[len("pipe:"):].split()
    return next((w for w in reversed(words) if w.lower().endswith(TAR_EXTENSIONS)), path)
