"""Webdataset tar shards: finding them, counting their samples, reading them strictly.

A shard holds samples as consecutive files sharing a key: ``0001.jpg``, ``0001.txt``,
``0001.cls``. Python's ``tarfile`` stops *silently* at a damaged header anywhere past the
first member, so a truncated shard would look like a short one; ``read_shard`` makes
any damage raise ``CorruptShard`` instead, after yielding the samples before it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
import zlib
from typing import IO, Iterator
from urllib.parse import urlparse

import fsspec
import torch
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext

from .samples import BadSample, DataError, MISSING_IMAGE, MISSING_LABEL, Preprocess, load_image, read_caption, read_label
from .spec import DataSpec, local_path, location

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptShard(Exception):
    """A shard that cannot be read to its end."""


class _StrictTarInfo(tarfile.TarInfo):
    """Turn tarfile's silent stop at a bad or missing header into an error.

    A well-formed archive ends with a zero block (``EOFHeaderError``, still a clean end);
    no block, a short block or garbage where a header should be means it was cut or damaged.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as error:
            raise tarfile.ReadError(f"truncated or damaged archive ({error})") from None


def read_shard(url: str) -> Iterator[dict[str, bytes | str]]:
    """Yield the samples of one shard in file order, as ``{"__key__": key, ext: bytes}``.

    ``url``: see ``open_shard``. Raises ``CorruptShard`` where the file is damaged; the
    sample being assembled there is dropped.
    """
    try:
        with open_shard(url) as stream, \
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            sample: dict = {}
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None:
                    continue  # directories, and webdataset's __meta__ files
                ext = ext.lower()
                if sample and (key != sample["__key__"] or ext in sample):
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = tar.extractfile(member).read()
            if sample:
                yield sample
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise CorruptShard(f"{type(error).__name__}: {error}") from None


def _by_fsspec(url: str) -> bool:
    """URLs open_clip_train reads through webdataset's gopen (pipe:, http(s)://, file://, gs://
    ...) are read the same way; every other URL (s3://, memory://, ...) through fsspec."""
    scheme = urlparse(url).scheme
    return "://" in url and scheme not in gopen_schemes and scheme != "file"


def open_shard(url: str) -> IO[bytes]:
    """A shard's bytes: a path, a ``pipe:`` command, or a URL (see ``_by_fsspec``)."""
    return fsspec.open(url, "rb").open() if _by_fsspec(url) else gopen(url, "rb")


def parse_sample(raw: dict, spec: DataSpec) -> tuple[bytes, str, int | None]:
    """(encoded image, caption, label or None) of a raw sample; raises ``BadSample``.
    Without ``spec.captions`` the caption is not read (an empty one is returned) and the label
    is required. Training reads no label: it uses none, and a bad .cls must not cost the pair."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise BadSample(MISSING_IMAGE, f"no {'/'.join(IMAGE_EXTENSIONS)} file for key {raw['__key__']!r}")
    caption = read_caption(raw.get("txt")) if spec.captions else ""
    label = None if spec.is_train else read_label(raw.get("cls"), required=not spec.captions)
    return raw[ext], caption, label


def check_shards(shards: list[str], spec: DataSpec) -> None:
    """Fail early, naming the flag, when local shards do not exist."""
    if not shards:
        raise ValueError(f"{spec.flag} is empty: give shard paths such as 'data/train/shard-{{000000..000009}}.tar'")
    for url in shards:
        if _by_fsspec(url):
            _check_protocol(url, spec)
    missing = [s for s in shards if local_path(s) is not None and not os.path.isfile(local_path(s))]
    if len(missing) == len(shards):
        raise FileNotFoundError(f"no shards match {spec.flag} {spec.paths!r}: check the path")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {spec.flag} {spec.paths!r} "
                                f"do not exist (first: {missing[0]!r}): check the brace range")


def _check_protocol(url: str, spec: DataSpec) -> None:
    protocol = urlparse(url).scheme
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise ValueError(f"{spec.flag} {url!r}: fsspec cannot read {protocol}:// ({error}): install its "
                         f"package, or stream the shards with 'pipe:COMMAND URL'") from None


UNLABELLED_PROBE = 16  # samples without a class id, before any usable one: the set has none


def probe_shards(shards: list[str], spec: DataSpec, preprocess: Preprocess) -> None:
    """Fail before the first step, naming the flag, when no shard gives a readable sample
    (garbage, a CSV given as shards, zero-shot shards without .cls files); shards are tried
    in order up to the first good one."""
    problems, unlabelled = [], 0
    for url, raw in _raw_samples(shards, problems):
        try:
            image, _, _ = parse_sample(raw, spec)
            with torch.random.fork_rng(devices=[]):  # the trainer's stream stays untouched
                load_image(image, preprocess)
            return
        except BadSample as bad:
            problems.append(f"{url}:{raw['__key__']}: {bad}")
            unlabelled += bad.reason == MISSING_LABEL
            if unlabelled == UNLABELLED_PROBE:  # not a sample, the set: no need to read it all
                break
    if unlabelled:
        raise DataError(f"{spec.flag} {spec.paths!r}: its first samples have no class id: zero-shot "
                        f"shards need one per sample, an integer in KEY.cls")
    raise DataError(f"no usable sample in any of the {len(shards)} shards of {spec.flag} {spec.paths!r} "
                    f"(last: {problems[-1] if problems else 'no samples'}): check the path, or --dataset-type "
                    f"csv for CSV files")


def _raw_samples(shards: list[str], problems: list[str]) -> Iterator[tuple[str, dict]]:
    """(url, raw sample) of the shards in order; a corrupt shard's error joins `problems`."""
    for url in shards:
        try:
            for raw in read_shard(url):
                yield url, raw
        except CorruptShard as error:
            problems.append(f"{url}: {error}")


def count_samples(url: str) -> int:
    """Samples in one local shard, from its headers alone; a damaged shard counts up to the damage."""
    keys, last = 0, None
    try:
        with tarfile.open(local_path(url), "r:*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if member.isreg() and key is not None and key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass  # reading it will count the damage
    return keys


def shard_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard, for the shards that a ``sizes.json`` or ``_info.json`` beside them
    lists (beside the tar file a ``pipe:`` command names; read with fsspec for a URL)."""
    by_dir: dict[str, dict[str, int]] = {}
    sizes = {}
    for shard in shards:
        where = location(shard)
        directory = posixpath.dirname(where) if "://" in where else os.path.dirname(where)
        if directory not in by_dir:
            by_dir[directory] = _read_size_files(directory)
        count = by_dir[directory].get(posixpath.basename(where))
        if count is not None:
            sizes[shard] = count
    return sizes


def _read_size_files(directory: str) -> dict[str, int]:
    """Shard name -> samples, from open_clip's ``sizes.json`` or an ``_info.json`` (timm or wids)."""
    for name in ("sizes.json", "_info.json"):
        path = posixpath.join(directory, name) if "://" in directory else os.path.join(directory or ".", name)
        try:
            with fsspec.open(path, "r") as f:
                text = f.read()
        except (OSError, ImportError, ValueError):  # absent, unreachable, or no fsspec backend
            continue
        try:
            return _sizes_from_json(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            # only a convenience: without it the user passes the number of samples
            logging.warning("ignoring %s, not a shard-size file (%s: %s)", path, type(error).__name__, error)
    return {}


def _sizes_from_json(info: dict) -> dict[str, int]:
    if "splits" in info:  # timm: {"splits": {name: {"filenames": [...], "shard_lengths": [...]}}}
        return {os.path.basename(f): int(n) for split in info["splits"].values()
                for f, n in zip(split["filenames"], split["shard_lengths"])}
    if "shardlist" in info:  # wids: {"shardlist": [{"url": ..., "nsamples": ...}]}
        return {os.path.basename(s["url"]): int(s["nsamples"]) for s in info["shardlist"]}
    return {os.path.basename(k): int(v) for k, v in info.items()}  # open_clip: {name: count}
