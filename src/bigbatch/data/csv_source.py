"""CSV/TSV files of (image path, caption[, label]) rows, as open_clip's ``--dataset-type csv``.

Relative image paths are resolved against the directory of the CSV that names them, so
a data set folder can be moved as a whole. Several files may be joined with '::'.
"""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from typing import NamedTuple

from .batch import Tokenizer
from .mapstyle import make_map_data
from .samples import (MISSING_IMAGE, OVERSIZED_FIELD, BadSample, Preprocess, Sample, load_image, read_caption,
                      read_label)
from .spec import DataInfo, DataSpec, expand_paths

FIELD_LIMIT = 131072  # characters: csv's default limit; a longer field is a bad row, not a bad file


class Row(NamedTuple):
    image: str  # absolute path, or "" when the cell is empty
    caption: str | None  # None: not read (DataSpec.captions is False)
    label: str | None  # None: no label column read (training, or no --csv-label-key)
    where: str  # "file row N", for messages
    problem: str = ""  # a row that cannot be read (oversized field), counted when its turn comes


@contextmanager
def _no_field_limit():
    """Read any field whole, so that one oversized field costs its row and not the file."""
    old = csv.field_size_limit(2**31 - 1)  # the largest a C long takes everywhere
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _separator(spec: DataSpec) -> str:
    sep = "\t" if spec.csv_separator == "\\t" else spec.csv_separator  # "\\t" typed in a shell
    if len(sep) != 1:
        raise ValueError(f"--csv-separator must be one character, got {spec.csv_separator!r}")
    return sep


def _column(columns: list[str], key: str, flag: str, path: str) -> str:
    if key in columns:
        return key
    hint = " (only one column: is --csv-separator right?)" if len(columns) == 1 else ""
    raise ValueError(f"{path} has no column {key!r}; its columns are {columns}{hint}: "
                     f"set {flag} to one of them")


def check_columns(path: str, spec: DataSpec) -> None:
    """The file exists and its header has the columns the flags name (rows are read later)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no CSV file at {path!r} ({spec.flag} {spec.paths!r}): check the path")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f, _no_field_limit():
        columns = next(csv.reader(f, delimiter=_separator(spec)), [])
    for key, flag in ((spec.csv_img_key, "--csv-img-key"), (spec.captions and spec.csv_caption_key, "--csv-caption-key"),
                      (not spec.is_train and spec.csv_label_key, "--csv-label-key")):
        if key:
            _column(columns, key, flag, path)


def read_rows(path: str, spec: DataSpec) -> list[Row]:
    """The rows of one CSV, with image paths made absolute."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no CSV file at {path!r} ({spec.flag} {spec.paths!r}): check the path")
    # undecodable bytes are kept (as surrogates) and make their row bad, not the file
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f, _no_field_limit():
        reader = csv.DictReader(f, delimiter=_separator(spec))
        columns = list(reader.fieldnames or [])
        image = _column(columns, spec.csv_img_key, "--csv-img-key", path)
        caption = spec.captions and _column(columns, spec.csv_caption_key, "--csv-caption-key", path)
        # training reads no label: it uses none, and a bad one must not cost the pair
        label = not spec.is_train and spec.csv_label_key and _column(columns, spec.csv_label_key, "--csv-label-key", path)
        base = os.path.dirname(os.path.abspath(path))
        # short rows leave None in missing cells: load() counts them as bad samples
        return [Row(os.path.join(base, os.path.expanduser(r[image])) if r[image] else "",
                    (r[caption] or "") if caption else None, (r[label] or "") if label else None, f"{path} row {reader.line_num}",
                    _oversized(r)) for r in reader]


def _oversized(row: dict) -> str:
    longest = max((len(v) for v in row.values() if isinstance(v, str)), default=0)
    return f"a field of {longest} characters (more than {FIELD_LIMIT})" if longest > FIELD_LIMIT else ""


class CsvSource:
    """Rows of one or more CSV files, loaded lazily."""

    def __init__(self, rows: list[Row], preprocess: Preprocess, name: str):
        self.rows, self.preprocess, self.name = rows, preprocess, name

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> Sample:
        row = self.rows[index]
        try:
            if row.problem:
                raise BadSample(OVERSIZED_FIELD, row.problem)
            if not row.image:
                raise BadSample(MISSING_IMAGE, "empty image path")
            caption = "" if row.caption is None else read_caption(row.caption)  # cheap checks first
            label = read_label(row.label, required=row.label is not None)  # a label column: each row needs one
            return Sample(load_image(row.image, self.preprocess), caption, label)
        except BadSample as bad:
            raise BadSample(bad.reason, f"{row.where}: {bad.detail}" if bad.detail else row.where) from None


def make_csv_data(spec: DataSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> DataInfo:
    """Batches from the CSV file(s) named by ``spec.paths``."""
    files = expand_paths(spec.paths)
    if not files:
        raise ValueError(f"{spec.flag} is empty: give the path of a CSV file")
    rows = [row for path in files for row in read_rows(path, spec)]
    name = f"{spec.flag} {spec.paths!r}"
    if not rows:
        raise ValueError(f"{name} has no rows: check the file")
    return make_map_data(CsvSource(rows, preprocess, name), spec, tokenizer)
