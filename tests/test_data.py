"""bigbatch.data: the three sources, epoch arithmetic, sharding, shuffling and bad data."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T

import bigbatch.data.wds_source
from bigbatch.data import Batch, DataError, DataSpec, make_data
from bigbatch.demo_data import main as demo_main
from bigbatch.data.demo import write_demo_dataset
from bigbatch.data.shapes import CLASSNAMES, COLORS, TEMPLATES, draw_sample

PRE = T.Compose([T.Resize((32, 32)), T.ToTensor()])
TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=16)


# --- helpers


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """48 train samples in 8 shards of 6, 20 val samples in 4 shards."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=48, num_val=20,
                              image_size=32, shard_size=6, seed=0)


def load(paths: str, batch_size: int = 8, **kw) -> tuple[object, list[Batch]]:
    """make_data with the test transform and tokenizer, plus one epoch of batches."""
    info = make_data(DataSpec(paths, kw.pop("dataset_type", "auto"), batch_size, **kw), PRE, TOKENIZER)
    return info, list(info.loader)


def ids(batches: list[Batch]) -> list[str]:
    """One fingerprint per sample, in order (the demo images are all distinct)."""
    return [hashlib.md5(image.numpy().tobytes()).hexdigest() for b in batches for image in b.images]


def skipped(batches: list[Batch]) -> Counter:
    return sum((Counter(b.skipped) for b in batches), Counter())


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    draw_sample(random.Random(seed), 32)[0].save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> list[int]:
    """Write samples ({"__key__": ..., ext: bytes}) as a tar; return the offset after each sample."""
    ends = []
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            ends.append(tar.offset)
    return ends


def good(key: str, seed: int) -> dict[str, bytes]:
    return {"__key__": key, "png": png(seed), "txt": f"sample {key}".encode(), "cls": b"1"}


# --- demo data


def test_demo_writes_shards_sizes_and_class_files(demo):
    train, val = Path(demo["out_dir"]) / "train", Path(demo["out_dir"]) / "val"
    assert demo["train"]["pattern"] == str(train / "shard-{000000..000007}.tar")
    assert (demo["train"]["num_samples"], demo["train"]["num_shards"]) == (48, 8)
    assert (demo["val"]["num_samples"], demo["val"]["num_shards"]) == (20, 4)
    assert json.loads((train / "sizes.json").read_text()) == {f"shard-{i:06d}.tar": 6 for i in range(8)}
    assert json.loads((val / "sizes.json").read_text())["shard-000003.tar"] == 2
    assert Path(demo["classnames"]).read_text().split("\n")[:-1] == CLASSNAMES
    assert Path(demo["templates"]).read_text().split("\n")[:-1] == TEMPLATES
    with tarfile.open(train / "shard-000001.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["00000006.png", "00000006.txt", "00000006.cls"] and len(names) == 18


def test_demo_main_prints_patterns(tmp_path, capsys):
    assert demo_main([str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert f"train: 3 samples in 1 shard: {tmp_path / 'train' / 'shard-000000.tar'}" in out
    assert (tmp_path / "val" / "shard-000000.tar").is_file()


def test_demo_train_and_val_differ_and_seed_reproduces(tmp_path):
    a = write_demo_dataset(tmp_path / "a", num_train=4, num_val=4, image_size=16, seed=0)
    b = write_demo_dataset(tmp_path / "b", num_train=4, num_val=4, image_size=16, seed=0)
    read = lambda summary, split: Path(summary[split]["pattern"]).read_bytes()  # noqa: E731
    assert read(a, "train") == read(b, "train")
    assert read(a, "train") != read(a, "val")


def test_shapes_vocabulary_and_captions():
    assert len(set(CLASSNAMES)) == len(CLASSNAMES) >= 6 and len(set(COLORS)) >= 6
    for rng in (random.Random(1), np.random.default_rng(1)):
        for _ in range(30):
            image, caption, label = draw_sample(rng, image_size=40)
            assert image.size == (40, 40) and image.mode == "RGB"
            assert CLASSNAMES[label] in caption.split() and any(c in caption.split() for c in COLORS)
    assert {draw_sample(random.Random(s))[2] for s in range(60)} == set(range(len(CLASSNAMES)))
    assert draw_sample(random.Random(5))[1] == draw_sample(random.Random(5))[1]


# --- webdataset


def test_demo_round_trip(demo):
    info, batches = load(demo["train"]["pattern"], workers=0)
    assert (info.num_samples, info.num_batches, len(info.loader), len(batches)) == (48, 6, 6, 6)
    batch = batches[0]
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.texts.shape == (8, 16) and batch.texts.dtype == torch.long
    assert batch.labels is None  # training reads no .cls: it uses none
    assert batch.skipped == {}
    _, val = load(demo["train"]["pattern"], is_train=False, workers=0)
    assert sorted(ids(batches)) == sorted(ids(val)) and len(set(ids(val))) == 48
    labels = val[0].labels  # validation's zero-shot does
    assert labels.dtype == torch.long and 0 <= labels.min() <= labels.max() < 6


def test_val_reads_once_in_order_with_known_length(demo):
    info, first = load(demo["val"]["pattern"], batch_size=4, is_train=False, workers=2)
    # 2 workers: shards 0, 2 (6 + 6 samples) and 1, 3 (6 + 2): 3 + 2 batches
    assert (info.num_samples, info.num_batches, len(first)) == (20, 5, 5)
    assert ids(first) == ids(list(info.loader))
    assert len(set(ids(first))) == 20


def test_train_epoch_length_and_partial_last_batch(demo):
    info, batches = load(demo["train"]["pattern"], num_samples=45, workers=2)
    assert (info.num_samples, info.num_batches) == (45, 6)
    assert [len(b.images) for b in batches] == [8, 8, 8, 7, 7, 7]  # each worker's share, evenly
    for rank in (0, 1):
        info, batches = load(demo["train"]["pattern"], num_samples=45, workers=2, rank=rank, world_size=2)
        assert (info.num_samples, info.num_batches) == (45, 4)  # 23 + 22: nothing repeated
        assert len(batches) == 4 and sum(len(b.images) for b in batches) in (22, 23)


def test_brace_patterns_and_joined_sources(demo):
    train = Path(demo["out_dir"]) / "train"
    joined = f"{train}/shard-{{000000..000003}}.tar::{train}/shard-{{000004..000007}}.tar"
    info, batches = load(joined, is_train=False, workers=0)
    _, whole = load(demo["train"]["pattern"], is_train=False, workers=0)
    assert info.num_samples == 48 and ids(batches) == ids(whole)
    info, _ = load(f"{train}/shard-{{000000..000002}}.tar::{train}/shard-000005.tar", is_train=False)
    assert info.num_samples == 24


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_and_workers_partition_the_data(demo, world_size):
    per_setting = {}
    for workers in (0, 2):
        ranks = [ids(load(demo["train"]["pattern"], batch_size=3, workers=workers, seed=3,
                          rank=r, world_size=world_size)[1]) for r in range(world_size)]
        assert len({len(r) for r in ranks}) == 1  # every rank the same number of samples
        everything = [i for r in ranks for i in r]
        assert len(everything) == len(set(everything)) == 48  # no overlap, nothing missing
        per_setting[workers] = sorted(everything)
    assert per_setting[0] == per_setting[2]


def test_shuffle_is_a_function_of_seed_and_epoch(demo):
    def epoch_ids(seed: int, epoch: int, workers: int = 2) -> list[str]:
        spec = DataSpec(demo["train"]["pattern"], "webdataset", 8, workers=workers, seed=seed)
        info = make_data(spec, PRE, TOKENIZER)
        info.set_epoch(epoch)
        return ids(list(info.loader))

    a = epoch_ids(0, 1)
    assert a == epoch_ids(0, 1)
    assert a != epoch_ids(0, 2) and sorted(a) == sorted(epoch_ids(0, 2))
    assert a != epoch_ids(1, 1)
    # set_epoch reaches persistent workers between epochs of the same loader
    info = make_data(DataSpec(demo["train"]["pattern"], "webdataset", 8, workers=2), PRE, TOKENIZER)
    info.set_epoch(1)
    assert ids(list(info.loader)) == a
    info.set_epoch(2)
    assert ids(list(info.loader)) == epoch_ids(0, 2)


def test_shard_order_follows_the_epoch(demo, monkeypatch):
    monkeypatch.setattr(bigbatch.data.wds_source, "SHUFFLE_BUFFER", 1)  # samples in shard order
    orders = []
    for epoch in (1, 1, 2):
        info = make_data(DataSpec(demo["train"]["pattern"], "webdataset", 6, workers=0), PRE, TOKENIZER)
        info.set_epoch(epoch)
        orders.append(ids(list(info.loader)))
    shards = [ids(load(f"{demo['out_dir']}/train/shard-{i:06d}.tar", 6, is_train=False)[1]) for i in range(8)]
    assert sorted(orders[0][:6]) in [sorted(s) for s in shards]  # whole shards, not mixed
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_too_few_shards_names_the_fixes(demo):
    with pytest.raises(ValueError, match=r"8 shards, fewer than the 9 ranks.*"
                                         r"add shards or use --dataset-resampled"):
        make_data(DataSpec(demo["train"]["pattern"], "auto", 8, workers=2, world_size=9), PRE, TOKENIZER)
    info, batches = load(demo["train"]["pattern"], workers=2, world_size=5, resampled=True)
    assert (info.num_samples, info.num_batches) == (50, 2) and [len(b.images) for b in batches] == [8, 2]


def test_unknown_sizes_are_counted(demo, tmp_path):
    for shard in (Path(demo["out_dir"]) / "train").glob("*.tar"):
        shutil.copy(shard, tmp_path)
    pattern = str(tmp_path / "shard-{000000..000007}.tar")
    assert make_data(DataSpec(pattern, "auto", 8), PRE, TOKENIZER).num_samples == 48  # no sizes.json
    with pytest.raises(ValueError, match="cannot tell how many samples.*pass --train-num-samples"):
        make_data(DataSpec(pattern, "auto", 8, resampled=True), PRE, TOKENIZER)
    assert load(pattern, num_samples=16, workers=0)[0].num_batches == 2
    info, batches = load(pattern, is_train=False, workers=0)
    assert (info.num_samples, info.num_batches, len(ids(batches))) == (None, None, 48)


def test_size_from_info_json(demo, tmp_path):
    for shard in (Path(demo["out_dir"]) / "train").glob("*.tar"):
        shutil.copy(shard, tmp_path)
    names = [f"shard-{i:06d}.tar" for i in range(8)]
    info = {"splits": {"train": {"filenames": names, "shard_lengths": [5] * 8, "num_samples": 40}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    spec = DataSpec(str(tmp_path / "shard-{000000..000007}.tar"), "auto", 8)
    assert make_data(spec, PRE, TOKENIZER).num_samples == 40


def test_missing_shards_fail_early(demo, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no shards match --train-data '.*nope-\{0\.\.3\}\.tar': check"):
        make_data(DataSpec(str(tmp_path / "nope-{0..3}.tar"), "auto", 8), PRE, TOKENIZER)
    train = Path(demo["out_dir"]) / "train"
    with pytest.raises(FileNotFoundError, match=r"2 of the 10 shards of --val-data .* do not exist"):
        make_data(DataSpec(f"{train}/shard-{{000000..000009}}.tar", "auto", 8, is_train=False), PRE, TOKENIZER)


@pytest.fixture
def bad_shards(tmp_path) -> tuple[str, int]:
    """Five shards with every kind of damage; returns (pattern, number of good samples)."""
    write_shard(tmp_path / "s0.tar", [good(f"a{i}", i) for i in range(6)])
    write_shard(tmp_path / "s1.tar", [
        good("b0", 10),
        {"__key__": "b1", "png": b"not an image at all", "txt": b"garbage png"},
        {"__key__": "b2", "png": png(11)[:60], "txt": b"truncated png"},
        {"__key__": "b3", "png": png(12)},  # no caption
        {"__key__": "b4", "png": png(13), "txt": b"  \n"},  # empty caption
        {"__key__": "b5", "txt": b"no image"},
        good("b6", 14),
    ])
    ends = write_shard(tmp_path / "s2.tar", [good(f"c{i}", 20 + i) for i in range(6)])
    with open(tmp_path / "s2.tar", "r+b") as f:
        f.truncate(ends[2])  # cut after 3 samples: tarfile alone would not notice; the third,
        # being assembled at the cut, is dropped (it might have had more files)
    ends = write_shard(tmp_path / "s3.tar", [good(f"d{i}", 30 + i) for i in range(6)])
    with open(tmp_path / "s3.tar", "r+b") as f:
        f.truncate(ends[3] + 700)  # cut inside the png of the fifth sample: four are whole
    (tmp_path / "s4.tar").write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(3000)))
    return str(tmp_path / "s{0..4}.tar"), 6 + 2 + 2 + 4


EXPECTED_SKIPS = {"unreadable image": 2, "missing caption": 2, "missing image": 1, "corrupt shard": 3}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_data_is_skipped_and_counted(bad_shards, workers, caplog):
    pattern, num_good = bad_shards
    with caplog.at_level(logging.WARNING):
        info, batches = load(pattern, batch_size=4, is_train=False, workers=workers)
    assert sum(len(b.images) for b in batches) == num_good
    assert skipped(batches) == EXPECTED_SKIPS
    warned = " ".join(r.getMessage() for r in caplog.records)  # named by the loader, any workers
    assert all(f"s{i}.tar" in warned for i in (2, 3, 4)) and "s1.tar:b3" in warned and "s0.tar" not in warned


def test_training_goes_on_over_bad_data(bad_shards):
    pattern, num_good = bad_shards
    info, batches = load(pattern, batch_size=4, num_samples=40, workers=0)  # more than the data
    # each shard read once: every good sample trained once, every bad one counted once
    assert sum(len(b.images) for b in batches) == num_good and len(batches) <= info.num_batches
    assert skipped(batches) == EXPECTED_SKIPS


@pytest.mark.parametrize("workers, resampled", [(0, False), (2, False), (0, True)])
def test_nothing_usable_is_one_clear_error(tmp_path, workers, resampled):
    for i in range(2):
        write_shard(tmp_path / f"{i}.tar", [{"__key__": f"{i}{j}", "png": b"junk", "txt": b"x"} for j in range(3)])
    spec = DataSpec(str(tmp_path / "{0..1}.tar"), "auto", 4, num_samples=8, workers=workers, resampled=resampled)
    with pytest.raises(DataError) as error:
        list(make_data(spec, PRE, TOKENIZER).loader)
    message = str(error.value)
    assert message.startswith("no usable sample in any of the 2 shards of --train-data")
    assert "unreadable image" in message and "Traceback" not in message and "\n" not in message
    assert "1.tar:12" in message  # the last bad sample, named


def test_val_with_nothing_usable_raises(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"\0garbage" * 100)
    with pytest.raises(DataError, match="no usable sample in any of the 1 shards of --val-data"):
        make_data(DataSpec(str(tmp_path / "0.tar"), "auto", 8, is_train=False, workers=0), PRE, TOKENIZER)


# --- csv


@pytest.fixture
def csv_data(tmp_path) -> Path:
    """ds/train.csv (comma separated, columns img/caption/label) naming images relative to ds/."""
    (tmp_path / "ds" / "images").mkdir(parents=True)
    rows = []
    for i in range(10):
        draw_sample(random.Random(i), 32)[0].save(tmp_path / "ds" / "images" / f"{i}.png")
        rows.append({"img": f"images/{i}.png", "caption": f"picture {i}", "label": str(i)})
    with open(tmp_path / "ds" / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["img", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "ds" / "train.csv"


def csv_spec(path: Path, **kw) -> DataSpec:
    options = dict(csv_img_key="img", csv_caption_key="caption", csv_separator=",", csv_label_key="label")
    return DataSpec(str(path), kw.pop("dataset_type", "auto"), kw.pop("batch_size", 4), **{**options, **kw})


def test_csv_relative_paths_custom_keys_and_labels(csv_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the CSV's directory: paths must resolve against the CSV
    info = make_data(csv_spec(csv_data, is_train=False, workers=0), PRE, TOKENIZER)
    batches = list(info.loader)
    assert (info.num_samples, info.num_batches, [len(b.images) for b in batches]) == (10, 3, [4, 4, 2])
    assert torch.cat([b.labels for b in batches]).tolist() == list(range(10))
    assert torch.equal(batches[0].texts, TOKENIZER([f"picture {i}" for i in range(4)]))
    assert batches[0].images.shape == (4, 3, 32, 32) and skipped(batches) == {}



@pytest.mark.parametrize("workers, step_batches, in_flight", [(1, 4, 4), (2, 4, 3), (8, 4, 2), (1, 64, 4),
                                                               (0, 4, None)])
def test_the_workers_keep_a_steps_micro_batches_in_flight(csv_data, workers, step_batches, in_flight):
    """A step's batches plus the one the Loader holds back, per worker: at least torch's 2,
    at most 4 (the host's shared memory)."""
    info = make_data(csv_spec(csv_data, workers=workers, step_batches=step_batches), PRE, TOKENIZER)
    assert info.loader.dataloader.prefetch_factor == in_flight


def test_shard_workers_keep_a_steps_micro_batches_in_flight_too(demo):
    spec = DataSpec(demo["train"]["pattern"], "webdataset", 4, workers=2, step_batches=4)
    assert make_data(spec, PRE, TOKENIZER).loader.dataloader.prefetch_factor == 3

def test_csv_tab_separated_defaults(tmp_path, csv_data):
    (tmp_path / "ds" / "train.tsv").write_text("filepath\ttitle\nimages/0.png\ta circle\n")
    batch = next(iter(make_data(DataSpec(str(tmp_path / "ds" / "train.tsv"), "auto", 4), PRE, TOKENIZER).loader))
    assert len(batch.images) == 1 and batch.labels is None


def test_csv_missing_column_names_columns_and_flag(csv_data):
    with pytest.raises(ValueError, match=r"no column 'filepath'.*\['img', 'caption', 'label'\].*--csv-img-key"):
        make_data(csv_spec(csv_data, csv_img_key="filepath"), PRE, TOKENIZER)
    with pytest.raises(ValueError, match=r"no column 'title'.*--csv-caption-key"):
        make_data(csv_spec(csv_data, csv_caption_key="title"), PRE, TOKENIZER)
    with pytest.raises(ValueError, match=r"only one column: is --csv-separator right"):
        make_data(csv_spec(csv_data, csv_separator="\t"), PRE, TOKENIZER)


def test_csv_bad_rows_are_skipped_and_counted_once(csv_data):
    images = csv_data.parent / "images"
    (images / "3.png").write_bytes(b"garbage")
    (images / "7.png").unlink()
    for workers in (0, 2):
        info = make_data(csv_spec(csv_data, workers=workers), PRE, key_tokenizer)
        for epoch in (0, 1):
            info.set_epoch(epoch)
            batches = list(info.loader)
            assert sum(len(b.images) for b in batches) == 8  # one batch or two are one smaller
            assert skipped(batches) == {"unreadable image": 1, "missing image": 1}
            rows = torch.cat([b.texts[:, 0] for b in batches]).tolist()
            assert sorted(rows) == [0, 1, 2, 4, 5, 6, 8, 9]  # every good row once, no stand-ins


def test_labels_are_read_for_evaluation_only(csv_data):
    """A class id that is missing, negative ("unlabelled") or not a number costs an
    evaluation sample (skipped, counted); training reads none: its pair trains."""
    text = csv_data.read_text().replace("images/3.png,picture 3,3", "images/3.png,picture 3,-1")
    csv_data.write_text(text.replace(",picture 5,5", ",picture 5,five").replace(",picture 7,7", ",picture 7,"))
    batches = list(make_data(csv_spec(csv_data, workers=0), PRE, key_tokenizer).loader)
    assert sum(len(b.images) for b in batches) == 10 and all(b.labels is None for b in batches)
    batches = list(make_data(csv_spec(csv_data, is_train=False, workers=0), PRE, TOKENIZER).loader)
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 1, 2, 4, 6, 8, 9]
    assert skipped(batches) == {"bad label": 2, "missing label": 1}


def test_csv_bad_rows_are_dropped_in_validation(csv_data):
    images = csv_data.parent / "images"
    (images / "3.png").write_bytes(b"garbage")
    for name in ("4.png", "5.png", "6.png", "7.png"):  # batch 2 is all bad: no batch, still counted
        (images / name).unlink()
    batches = list(make_data(csv_spec(csv_data, is_train=False, workers=0), PRE, TOKENIZER).loader)
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [0, 1, 2, 8, 9]  # each good row once, no stand-ins
    assert skipped(batches) == {"unreadable image": 1, "missing image": 4}


def test_csv_all_bad_is_one_clear_error(csv_data):
    for png_file in (csv_data.parent / "images").glob("*.png"):
        png_file.unlink()
    with pytest.raises(DataError, match=r"--train-data"):
        list(make_data(csv_spec(csv_data, workers=0), PRE, TOKENIZER).loader)


@pytest.mark.parametrize("rows, world_size, batch_size", [(10, 3, 4), (9, 2, 4), (17, 4, 2), (24, 2, 4)])
def test_ranks_share_every_row_once_in_equal_numbers_of_batches(rows, world_size, batch_size):
    """No row repeated, none padded; a rank one batch short splits its last one."""
    seen, counts = [], set()
    for rank in range(world_size):
        spec = DataSpec("", "synthetic", batch_size, num_samples=rows, seed=1, workers=0,
                        rank=rank, world_size=world_size)
        info = make_data(spec, PRE, TOKENIZER)
        batches = list(info.loader)
        assert info.num_samples == rows and len(batches) == info.num_batches
        assert all(0 < len(b.images) <= batch_size for b in batches)
        counts.add(len(batches))
        seen += ids(batches)
    assert len(counts) == 1  # every rank takes the same number of steps
    assert sorted(seen) == sorted(set(seen)) and len(seen) == rows


def test_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no CSV file at .*train\.csv.*--train-data"):
        make_data(DataSpec(str(tmp_path / "train.csv"), "csv", 4), PRE, TOKENIZER)


# --- synthetic, and type inference


def test_synthetic_is_deterministic_and_shuffles_per_epoch():
    def epoch(seed: int, epoch: int, **kw) -> list[Batch]:
        info = make_data(DataSpec("", "synthetic", 8, num_samples=24, seed=seed, workers=0, **kw), PRE, TOKENIZER)
        info.set_epoch(epoch)
        return list(info.loader)

    first = epoch(0, 0)
    assert [len(b.images) for b in first] == [8, 8, 8] and first[0].labels.shape == (8,)
    assert ids(first) == ids(epoch(0, 0))
    assert ids(first) != ids(epoch(0, 1)) and sorted(ids(first)) == sorted(ids(epoch(0, 1)))
    assert not set(ids(first)) & set(ids(epoch(0, 0, is_train=False)))  # val draws other shapes
    assert not set(ids(first)) & set(ids(epoch(1, 0)))
    default = make_data(DataSpec("", "synthetic", 100), PRE, TOKENIZER)
    assert (default.num_samples, default.num_batches) == (10_000, 100)


def test_dataset_type_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the data type of --train-data 'x.parquet'.*--dataset-type"):
        make_data(DataSpec("x.parquet", "auto", 4), PRE, TOKENIZER)
    with pytest.raises(ValueError, match="unknown --dataset-type 'tar'"):
        make_data(DataSpec("x.tar", "tar", 4), PRE, TOKENIZER)
    with pytest.raises(ValueError, match="--dataset-resampled applies to webdataset"):
        make_data(DataSpec("", "synthetic", 4, resampled=True), PRE, TOKENIZER)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["webdataset", "synthetic"])
def test_a_resumed_epoch_gives_exactly_the_remaining_batches(demo, kind, workers):
    """set_epoch(epoch, skip_batches=s) yields batches s, s+1, ... of the uninterrupted
    epoch, in order, whatever worker owned batch s."""
    spec = DataSpec(demo["train"]["pattern"] if kind == "webdataset" else None, kind, 5,
                    num_samples=48, workers=workers, seed=2)
    info = make_data(spec, PRE, TOKENIZER)
    info.set_epoch(3)
    whole = [ids([b]) for b in info.loader]
    assert len(whole) == info.num_batches
    for skip in (1, 2, 3, 7):
        info.set_epoch(3, skip_batches=skip)
        assert [ids([b]) for b in info.loader] == whole[skip:], skip


# --- the epoch: every readable sample exactly once


def key_tokenizer(captions: list[str]) -> torch.Tensor:
    """Captions "sample N" -> [[N]]: batches then say which samples they hold."""
    return torch.tensor([[int(c.split()[-1])] for c in captions])


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> tuple[str, list[int]]:
    """Five shards of 40, 24, 7, 13 and 1 samples (keys 0..84), with a sizes.json."""
    root, sizes, key = tmp_path_factory.mktemp("uneven"), [40, 24, 7, 13, 1], 0
    for i, n in enumerate(sizes):
        write_shard(root / f"{i}.tar", [good(str(k), k) for k in range(key, key + n)])
        key += n
    (root / "sizes.json").write_text(json.dumps({f"{i}.tar": n for i, n in enumerate(sizes)}))
    return str(root / "{0..4}.tar"), list(range(key))


@pytest.mark.parametrize("workers", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("batch_size, accum_freq", [(8, 1), (5, 3)])
def test_an_epoch_trains_every_sample_exactly_once(uneven_shards, workers, world_size, batch_size, accum_freq):
    from bigbatch.step import step_micro_batches
    pattern, keys = uneven_shards
    trained, steps = [], []
    for rank in range(world_size):
        spec = DataSpec(pattern, "auto", batch_size, workers=workers, rank=rank, world_size=world_size, seed=3)
        info = make_data(spec, PRE, key_tokenizer)
        info.set_epoch(1)
        groups = [list(step) for step in step_micro_batches(info.loader, accum_freq)]
        trained += [k for group in groups for b in group for k in b.texts[:, 0].tolist()]
        steps.append([len(group) for group in groups])  # micro-batches per step
        assert sum(steps[-1]) == info.num_batches and info.num_samples == len(keys)
        assert all(0 < len(b.images) <= batch_size for group in groups for b in group)
    assert sorted(trained) == keys  # a multiset comparison: none dropped, none repeated
    assert all(s == steps[0] for s in steps)  # ranks step together


def test_more_train_num_samples_than_data_trains_it_once(uneven_shards, caplog):
    pattern, keys = uneven_shards
    with caplog.at_level(logging.WARNING):
        info = make_data(DataSpec(pattern, "auto", 8, num_samples=1000, workers=2), PRE, key_tokenizer)
    assert "more than the 85 samples" in caplog.text and info.num_samples == 85
    assert sorted(k for b in info.loader for k in b.texts[:, 0].tolist()) == keys
    info = make_data(DataSpec(pattern, "auto", 8, num_samples=30, workers=2), PRE, key_tokenizer)
    subset = [k for b in info.loader for k in b.texts[:, 0].tolist()]
    assert len(subset) == len(set(subset)) == info.num_samples == 30


def test_undecodable_caption_is_skipped_and_named(tmp_path, caplog):
    write_shard(tmp_path / "0.tar", [good(str(k), k) for k in range(3)]
                + [{"__key__": "x", "png": png(9), "txt": b"caf\xe9 1"}])
    with caplog.at_level(logging.WARNING):
        info, batches = load(str(tmp_path / "0.tar"), workers=0, is_train=False)
    assert sum(len(b.images) for b in batches) == 3 and skipped(batches) == {"undecodable text": 1}
    assert "0.tar:x: undecodable text" in caplog.text


def test_a_csv_given_as_shards_fails_before_training(tmp_path):
    (tmp_path / "val.tar").write_text("filepath\ttitle\na.png\ta cat\n")
    with pytest.raises(DataError, match="no usable sample in any of the 1 shards of --val-data"):
        make_data(DataSpec(str(tmp_path / "val.tar"), "webdataset", 8, is_train=False), PRE, TOKENIZER)


def test_csv_rows_with_an_oversized_field_or_non_utf8_bytes_are_skipped_and_named(csv_data, caplog):
    with open(csv_data, "ab") as f:
        f.write(b"images/1.png,caf\xe9 au lait,1\n")  # latin-1, not UTF-8
        f.write(b"images/2.png," + b"x" * 1_000_000 + b",2\n")  # a 1 MB caption
    with caplog.at_level(logging.WARNING):
        batches = list(make_data(csv_spec(csv_data, is_train=False, workers=0), PRE, TOKENIZER).loader)
    assert sum(len(b.images) for b in batches) == 10
    assert skipped(batches) == {"undecodable text": 1, "oversized field": 1}
    assert "train.csv row 12: " in caplog.text and "train.csv row 13: " in caplog.text


# --- shards through pipe: commands and fsspec URLs


def _in_memory(root: Path, name: str, sizes: bool = True) -> str:
    """The uneven shards (and their sizes.json) copied into fsspec's memory filesystem."""
    import fsspec
    fs = fsspec.filesystem("memory")
    for path in root.glob("*.tar" if not sizes else "*"):
        fs.pipe(f"/{name}/{path.name}", path.read_bytes())
    return f"memory://{name}/{{0..4}}.tar"


@pytest.mark.parametrize("workers", [0, 2])
def test_pipe_and_fsspec_urls_read_the_epoch_of_the_local_path(uneven_shards, workers):
    """`pipe:cat` and fsspec URLs (file://, memory://) give the local path's batches, counted
    exactly by the sizes.json beside the shards (beside the file a pipe: command names)."""
    pattern, keys = uneven_shards
    root = Path(pattern).parent

    def epoch(paths: str, **kw) -> tuple[object, list[list[int]]]:
        info = make_data(DataSpec(paths, "auto", 8, workers=workers, seed=3, **kw), PRE, key_tokenizer)
        info.set_epoch(1)
        return info, [b.texts[:, 0].tolist() for b in info.loader]

    local_info, local = epoch(pattern)
    assert sorted(k for b in local for k in b) == keys
    for paths in (f"pipe:cat {root}/{{0..4}}.tar", f"file://{root}/{{0..4}}.tar", _in_memory(root, "sized")):
        info, batches = epoch(paths)
        assert (info.num_samples, info.num_batches, batches) == (local_info.num_samples, local_info.num_batches, local)
    # validation reads them once, in order, as well
    assert epoch(f"pipe:cat {root}/{{0..4}}.tar", is_train=False)[1] == epoch(pattern, is_train=False)[1]


def test_pipe_and_fsspec_shards_without_counts_name_the_fix(uneven_shards, tmp_path):
    pattern, _ = uneven_shards
    for path in Path(pattern).parent.glob("*.tar"):
        shutil.copy(path, tmp_path)
    for paths in (f"pipe:cat {tmp_path}/{{0..4}}.tar", _in_memory(tmp_path, "unsized", sizes=False)):
        where = paths.split()[-1] if paths.startswith("pipe:") else paths
        beside = where.replace("{0..4}.tar", "sizes.json")
        with pytest.raises(ValueError, match=rf"--train-data: no sizes.json lists shard '0.tar' .* write "
                                             rf"{re.escape(beside)} .* or pass --dataset-resampled with --train-num-samples"):
            make_data(DataSpec(paths, "auto", 8, workers=0), PRE, key_tokenizer)
        info = make_data(DataSpec(paths, "auto", 8, num_samples=20, resampled=True, workers=0), PRE, key_tokenizer)
        assert sum(len(b.images) for b in info.loader) == info.num_samples == 20
    with pytest.raises(ValueError, match=r"--train-data 'nofs://x/0.tar': fsspec cannot read nofs://"):
        make_data(DataSpec("nofs://x/0.tar", "auto", 8), PRE, key_tokenizer)
    # the data type comes from the file the pipe names, whatever follows it
    from bigbatch.data.factory import resolve_type
    assert resolve_type(DataSpec("pipe:aws s3 cp s3://bucket/0.tar -", "auto", 8)) == "webdataset"


def test_an_empty_class_id_is_a_missing_one_and_no_cls_is_no_label(tmp_path):
    """Validation shards: an empty .cls is a bad sample; a sample without a .cls has class
    id -1 (zero-shot leaves it out); a set without .cls files has no labels (retrieval only)."""
    samples = [good(str(k), k) for k in range(6)]
    for i, sample in enumerate(samples):
        sample["cls"] = b" " if i == 2 else str(i % 3).encode()
    write_shard(tmp_path / "0.tar", samples)
    batches = list(make_data(DataSpec(str(tmp_path / "0.tar"), "auto", 8, is_train=False, workers=0),
                             PRE, key_tokenizer).loader)
    assert batches[0].labels.tolist() == [0, 1, 0, 1, 2] and skipped(batches) == {"missing label": 1}
    for sample in samples[:3]:
        del sample["cls"]
    write_shard(tmp_path / "2.tar", samples)
    batches = list(make_data(DataSpec(str(tmp_path / "2.tar"), "auto", 8, is_train=False, workers=0),
                             PRE, key_tokenizer).loader)
    assert batches[0].labels.tolist() == [-1, -1, -1, 0, 1, 2] and skipped(batches) == {}
    for sample in samples[3:]:
        del sample["cls"]
    write_shard(tmp_path / "1.tar", samples)
    batches = list(make_data(DataSpec(str(tmp_path / "1.tar"), "auto", 8, is_train=False, workers=0),
                             PRE, key_tokenizer).loader)
    assert batches[0].labels is None and len(batches[0].images) == 6 and skipped(batches) == {}
