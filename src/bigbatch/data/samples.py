"""One image-text sample: reading its parts, and the ways it can be bad.

Bad data is never fatal: a reader raises ``BadSample(reason)``, the source skips the
sample and counts the reason, and the count reaches the train loop in ``Batch.skipped``.
``DataError`` is for the one fatal case, when nothing usable is left.
"""

from __future__ import annotations

import io
import os
from typing import Callable, NamedTuple

import torch
from PIL import Image

# the reasons a sample is skipped, as they appear in Batch.skipped
CORRUPT_SHARD = "corrupt shard"
UNREADABLE_IMAGE = "unreadable image"
MISSING_IMAGE = "missing image"
MISSING_CAPTION = "missing caption"
BAD_LABEL = "bad label"
MISSING_LABEL = "missing label"
UNDECODABLE_TEXT = "undecodable text"  # not UTF-8
OVERSIZED_FIELD = "oversized field"

Preprocess = Callable[[Image.Image], torch.Tensor]


class Sample(NamedTuple):
    image: torch.Tensor  # (3, H, W), preprocessed: uint8 (see bigbatch.inputs)
    caption: str
    label: int | None


class BadSample(Exception):
    """A sample to skip; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class DataError(ValueError):
    """Nothing usable left to load; the message says what to fix."""

    def __init__(self, message: str):
        # a DataLoader worker re-raises as DataError("Caught DataError in DataLoader worker
        # process 0. Original Traceback ..."): keep only our own last line
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("DataError: ", 1)[-1]
        super().__init__(message)


def load_image(source: bytes | str, preprocess: Preprocess) -> torch.Tensor:
    """Decode an image (encoded bytes or a file path) to RGB and preprocess it."""
    if isinstance(source, str) and not os.path.isfile(source):
        raise BadSample(MISSING_IMAGE, f"no file {source!r}")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            rgb = image.convert("RGB")  # forces the decode, so truncated files fail here
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadSample(UNREADABLE_IMAGE, f"{type(error).__name__}: {error}") from None
    return preprocess(rgb)  # outside the try: a broken transform is a bug, not bad data


def read_caption(value: bytes | str | None) -> str:
    """A stripped caption; empty or absent captions are bad samples."""
    caption = (_text(value) or "").strip()
    if not caption:
        raise BadSample(MISSING_CAPTION)
    return caption


def read_label(value: bytes | str | None, required: bool = False) -> int | None:
    """A class id (an integer >= 0; -1 often marks "unlabelled"), or None when the sample has
    none (no .cls) and needs none. An empty one is a missing one: the sample is bad."""
    if value is None:
        if required:
            raise BadSample(MISSING_LABEL, "no class id")
        return None
    text = _text(value).strip()
    if not text:
        raise BadSample(MISSING_LABEL, "an empty class id")
    try:
        label = int(text)
    except ValueError:
        raise BadSample(BAD_LABEL, f"{text[:20]!r} is not an integer") from None
    if label < 0:
        raise BadSample(BAD_LABEL, f"{label} is negative")
    return label


def _text(value: bytes | str | None) -> str | None:
    """Text from UTF-8 bytes; a replaced character would train on a caption nobody wrote."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample(UNDECODABLE_TEXT, f"byte {value[error.start]:#x} at {error.start} is not UTF-8") from None
    if value is not None and _has_surrogates(value):  # a CSV read with errors="surrogateescape"
        raise BadSample(UNDECODABLE_TEXT, "not UTF-8")
    return value


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
