"""The epoch under real ranks (gloo, two processes): every readable sample trained once.

Each rank iterates its loader as the train loop does (`step_micro_batches`), and the
parent compares what all ranks trained with what the data holds, as multisets. Ranks
must take the same number of steps; what a rank could not train because another ran out
(bad samples) is counted as left over, never dropped silently or repeated.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from bigbatch.data import DataSpec, make_data
from bigbatch.step import step_micro_batches
from test_data import PRE, good, key_tokenizer, png, write_shard
from test_distributed import run_ranks


@dataclass(frozen=True)
class Case:
    name: str
    paths: str
    workers: int
    batch_size: int
    accum_freq: int

    def __str__(self) -> str:  # names the ranks' result files
        return self.name


def epoch_keys(case: Case, world) -> dict:
    spec = DataSpec(case.paths, "auto", case.batch_size, workers=case.workers, seed=3,
                    rank=world.rank, world_size=world.world_size)
    info = make_data(spec, PRE, key_tokenizer)
    info.set_epoch(1)
    groups = [list(step) for step in step_micro_batches(info.loader, case.accum_freq)]
    skipped = sum((Counter(b.skipped) for group in groups for b in group), Counter())
    return {"keys": [k for group in groups for b in group for k in b.texts[:, 0].tolist()],
            "steps": [len(group) for group in groups], "left_over": info.loader.left_over,
            "skipped": dict(skipped)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Uneven clean shards; shards with bad samples; a CSV with a bad row. Keys are unique."""
    root = tmp_path_factory.mktemp("epoch_ranks")
    key, good_keys = 0, {}
    for name, sizes, bad in (("clean", [40, 24, 7, 13, 1], set()), ("bad", [17, 9, 12], {3, 20, 21})):
        (root / name).mkdir()
        good_keys[name], start = [], key
        for i, n in enumerate(sizes):
            samples = [good(str(k), k) for k in range(key, key + n)]
            for sample in samples:
                if int(sample["__key__"]) - start in bad:
                    del sample["txt"]  # a missing caption: skipped and counted
                else:
                    good_keys[name].append(int(sample["__key__"]))
            write_shard(root / name / f"{i}.tar", samples)
            key += n
        (root / name / "sizes.json").write_text(json.dumps({f"{i}.tar": n for i, n in enumerate(sizes)}))
    rows, csv_keys = [], []
    for k in range(key, key + 23):
        (root / f"{k}.png").write_bytes(png(k) if k != key + 5 else b"not a png")
        rows.append({"filepath": f"{k}.png", "title": f"sample {k}"})
        csv_keys += [] if k == key + 5 else [k]
    with open(root / "rows.tsv", "w", newline="") as f:  # .tsv: open_clip's default columns
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    cases = [Case("clean-w2-b5k3", str(root / "clean" / "{0..4}.tar"), 2, 5, 3),
             Case("clean-w0-b8k1", str(root / "clean" / "{0..4}.tar"), 0, 8, 1),
             Case("bad-w1-b4k2", str(root / "bad" / "{0..2}.tar"), 1, 4, 2),
             Case("csv-w2-b4k2", str(root / "rows.tsv"), 2, 4, 2)]
    out = tmp_path_factory.mktemp("epoch_ranks_out")
    run_ranks([(epoch_keys, case) for case in cases], 2, out, timeout=300)
    expected = {"clean": good_keys["clean"], "bad": good_keys["bad"], "csv": csv_keys}
    return {case.name: ([torch.load(out / f"epoch_keys-{case}.rank{r}.pt") for r in range(2)],
                        expected[case.name.split("-")[0]]) for case in cases}


@pytest.mark.parametrize("name", ["clean-w2-b5k3", "clean-w0-b8k1", "bad-w1-b4k2", "csv-w2-b4k2"])
def test_two_ranks_train_every_readable_sample_once(data, name):
    ranks, expected = data[name]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    trained = [k for r in ranks for k in r["keys"]]
    assert len(trained) == len(set(trained))  # nothing repeated
    assert set(trained) <= set(expected)  # nothing but readable samples
    assert len(trained) + sum(r["left_over"] for r in ranks) == len(expected)  # the rest counted
    assert ranks[0]["steps"] == ranks[1]["steps"]  # the ranks step together
    if name.startswith("clean"):
        assert sorted(trained) == expected  # clean data: all of it
    bad = sum((Counter(r["skipped"]) for r in ranks), Counter())
    assert sum(bad.values()) == {"clean": 0, "bad": 3, "csv": 1}[name.split("-")[0]]  # each once
