"""``make_data``: check a ``DataSpec`` and build its loader."""

from __future__ import annotations

import logging

from .batch import Tokenizer
from .csv_source import check_columns, make_csv_data
from .samples import Preprocess
from .spec import DATASET_TYPES, DataInfo, DataSpec, expand_paths, location
from .shards import check_shards
from .synthetic import make_synthetic_data
from .wds_source import make_webdataset_data

BUILDERS = {"webdataset": make_webdataset_data, "csv": make_csv_data, "synthetic": make_synthetic_data}
EXTENSIONS = {".tar": "webdataset", ".tgz": "webdataset", ".tar.gz": "webdataset",
              ".csv": "csv", ".tsv": "csv"}


def make_data(spec: DataSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> DataInfo:
    """Build the loader for ``spec``: ``preprocess`` maps a PIL image to a (3, H, W) tensor and
    ``tokenizer`` a list of captions to (n, L) token ids (open_clip's transform and tokenizer)."""
    kind = resolve_type(spec)
    _check(spec, kind)
    return BUILDERS[kind](spec, preprocess, tokenizer)


def check_data(spec: DataSpec) -> None:
    """What make_data checks without a model (type, flags, paths, CSV columns), so that a
    command can stop on a mistake before it builds one."""
    kind = resolve_type(spec)
    _check(spec, kind)
    if kind == "webdataset":
        check_shards(expand_paths(spec.paths), spec)
    elif kind == "csv":
        for path in expand_paths(spec.paths):
            check_columns(path, spec)


def resolve_type(spec: DataSpec) -> str:
    """The dataset type of this source: its file extensions decide when they agree (so
    --val-data x.csv is a CSV whatever --dataset-type says for the shards); else the flag."""
    if spec.dataset_type not in DATASET_TYPES:
        raise ValueError(f"unknown --dataset-type {spec.dataset_type!r}: use one of {', '.join(DATASET_TYPES)}")
    if spec.dataset_type == "synthetic":
        return "synthetic"
    kinds = {next((k for ext, k in EXTENSIONS.items() if location(p).lower().endswith(ext)), None)
             for p in expand_paths(spec.paths)}
    if len(kinds) == 1 and None not in kinds:
        kind = kinds.pop()
        if spec.dataset_type not in ("auto", kind):
            logging.getLogger("bigbatch").info(f"{spec.flag} {spec.paths!r} is read as {kind} data, "
                                               f"as its extensions say (not --dataset-type {spec.dataset_type})")
        return kind
    if spec.dataset_type != "auto":
        return spec.dataset_type
    raise ValueError(f"cannot tell the data type of {spec.flag} {spec.paths!r} from its extensions "
                     "(.tar: webdataset, .csv/.tsv: csv): pass --dataset-type webdataset, csv or synthetic")


def _check(spec: DataSpec, kind: str) -> None:
    if spec.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {spec.batch_size}")
    if spec.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {spec.workers}")
    if spec.num_samples is not None and spec.num_samples < 1:
        raise ValueError(f"{spec.num_samples_flag} must be at least 1, got {spec.num_samples}")
    if not 0 <= spec.rank < spec.world_size:
        raise ValueError(f"rank {spec.rank} is outside a world of {spec.world_size} processes")
    if kind == "webdataset" and spec.is_train and not spec.resampled and spec.paths \
            and len(expand_paths(spec.paths)) < spec.world_size:
        raise ValueError(f"{spec.flag} has {len(expand_paths(spec.paths))} shards, fewer than the "
                         f"{spec.world_size} ranks that each need one: add shards or use --dataset-resampled")
    if spec.resampled and spec.is_train and kind != "webdataset":
        raise ValueError(f"--dataset-resampled applies to webdataset shards, not {kind} data: drop it")
