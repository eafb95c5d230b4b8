"""Write the demo data set: procedural shapes as webdataset shards, ready for ``bigbatch train``.

Layout of ``out_dir``::

    train/shard-000000.tar ...   samples ``{key}.png``, ``{key}.txt`` (caption), ``{key}.cls`` (label)
    train/sizes.json             shard name -> number of samples (open_clip's convention)
    val/shard-000000.tar ...
    val/sizes.json
    classnames.txt               one class name per line, in label order
    templates.txt                one zero-shot prompt template per line, ``{}`` for the class
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
from pathlib import Path

from .shapes import CLASSNAMES, TEMPLATES, draw_sample


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # the noise barely compresses anyway
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member; GNU headers (not webdataset.TarWriter's PAX) halve the header overhead."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o444  # mtime stays 0: same seed, byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def _pattern(directory: Path, num_shards: int) -> str:
    """The brace pattern naming all shards of a split (a plain name when there is one)."""
    if num_shards == 1:
        return str(directory / "shard-000000.tar")
    return str(directory / f"shard-{{000000..{num_shards - 1:06d}}}.tar")


def write_split(directory: Path, num_samples: int, image_size: int, shard_size: int,
                rng: random.Random) -> dict:
    """Write ``num_samples`` shapes into shards of ``shard_size`` plus a sizes.json."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for start in range(0, num_samples, shard_size):
        name = f"shard-{len(sizes):06d}.tar"
        count = min(shard_size, num_samples - start)
        with tarfile.open(directory / name, "w", format=tarfile.GNU_FORMAT) as tar:
            for index in range(start, start + count):
                image, caption, label = draw_sample(rng, image_size)
                key = f"{index:08d}"
                _add(tar, f"{key}.png", _png(image))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.cls", str(label).encode())
        sizes[name] = count
    (directory / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return {"pattern": _pattern(directory, len(sizes)), "num_samples": num_samples, "num_shards": len(sizes)}


def write_demo_dataset(out_dir: str | Path, num_train: int = 10_240, num_val: int = 1_000,
                       image_size: int = 64, shard_size: int = 1_024, seed: int = 0) -> dict:
    """Write train and val shards of procedural shapes; return a summary of what was written.

    The summary has ``out_dir``, ``train`` and ``val`` (each with ``pattern``, the brace pattern
    to pass as ``--train-data`` / ``--val-data``, ``num_samples`` and ``num_shards``),
    ``classnames`` and ``templates`` (file paths) and ``seconds``.
    """
    if num_train < 1 or num_val < 1 or shard_size < 1 or image_size < 8:
        raise ValueError("demo data needs --num-train, --num-val and shard size >= 1 and --image-size >= 8")
    start = time.perf_counter()
    out = Path(out_dir)
    # string seeds are hashed with SHA-512: train and val never share a sample stream
    train = write_split(out / "train", num_train, image_size, shard_size, random.Random(f"train:{seed}"))
    val = write_split(out / "val", num_val, image_size, shard_size, random.Random(f"val:{seed}"))
    classnames, templates = out / "classnames.txt", out / "templates.txt"
    classnames.write_text("\n".join(CLASSNAMES) + "\n")
    templates.write_text("\n".join(TEMPLATES) + "\n")
    return {"out_dir": str(out), "train": train, "val": val, "classnames": str(classnames),
            "templates": str(templates), "seconds": round(time.perf_counter() - start, 2)}
