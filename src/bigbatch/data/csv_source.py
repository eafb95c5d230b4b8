"""CSV/TSV files of (image path, caption[, label]) rows, as open_clip's ``--dataset-type csv``.

Relative image paths are resolved against the directory of the CSV that names them, so
a data set folder can be moved as a whole. Several files may be joined with '::'.
"""

from __future__ import annotations

import csv
import os

from .batch import Tokenizer
from .mapstyle import make_map_data
from .samples import MISSING_IMAGE, BadSample, Preprocess, Sample, load_image, read_caption, read_label
from .spec import DataInfo, DataSpec, expand_paths

Row = tuple[str, str, str | None]  # (image path, caption, label)


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


def read_rows(path: str, spec: DataSpec) -> list[Row]:
    """The rows of one CSV, with image paths made absolute."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no CSV file at {path!r} ({spec.flag} {spec.paths!r}): check the path")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=_separator(spec))
        columns = list(reader.fieldnames or [])
        image = _column(columns, spec.csv_img_key, "--csv-img-key", path)
        caption = _column(columns, spec.csv_caption_key, "--csv-caption-key", path)
        label = spec.csv_label_key and _column(columns, spec.csv_label_key, "--csv-label-key", path)
        base = os.path.dirname(os.path.abspath(path))
        # short rows leave None in missing cells: load() counts them as bad samples
        return [(os.path.join(base, os.path.expanduser(r[image])) if r[image] else "",
                 r[caption] or "", r[label] if label else None) for r in reader]


class CsvSource:
    """Rows of one or more CSV files, loaded lazily."""

    def __init__(self, rows: list[Row], preprocess: Preprocess, name: str):
        self.rows, self.preprocess, self.name = rows, preprocess, name

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> Sample:
        path, caption, label = self.rows[index]
        if not path:
            raise BadSample(MISSING_IMAGE, f"empty image path in row {index}")
        caption, label = read_caption(caption), read_label(label)  # cheap checks before decoding
        return Sample(load_image(path, self.preprocess), caption, label)


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
