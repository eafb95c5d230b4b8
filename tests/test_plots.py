"""Plots write real PNGs from synthetic logs, including degenerate ones."""

import json
import math

from bigbatch.plots import _ema, plot_bench_table, plot_training_curves, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, steps=200, val_every=50, truncated=False):
    lines = []
    for step in range(1, steps + 1):
        lr = 1e-3 * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = 4.0 * math.exp(-step / 80) + 0.3 * math.sin(step) + 0.5
        lines.append({"kind": "train", "step": step, "loss": loss, "lr": lr, "samples_per_second": 900 + step % 7})
        if val_every and step % val_every == 0:
            acc = step / steps
            lines.append(
                {
                    "kind": "val",
                    "step": step,
                    "epoch": step // val_every,
                    "val_loss": 3.0 - 2 * acc,
                    "zeroshot_top1": 0.6 * acc,
                    "image_to_text_R@1": 0.4 * acc,
                    "text_to_image_R@1": 0.35 * acc,
                    "mean_recall": 0.5 * acc,
                    "image_to_text_mean_rank": 10 - 5 * acc,  # not a fraction: must not be drawn
                    "zeroshot_per_class": [acc, acc],
                }
            )
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    path.write_text(text + ('{"kind": "train", "st' if truncated else ""))
    return path


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_training_curves_full_log(tmp_path):
    log = write_log(tmp_path / "log.jsonl", truncated=True)
    out = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert_png(out)


def test_training_curves_without_val_and_with_one_point(tmp_path):
    assert_png(plot_training_curves(write_log(tmp_path / "a.jsonl", val_every=0), tmp_path / "a.png"))
    assert_png(plot_training_curves(write_log(tmp_path / "b.jsonl", steps=1, val_every=1), tmp_path / "b.png"))
    (tmp_path / "empty.jsonl").write_text("")
    assert_png(plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png"))


def test_read_log_skips_garbage_and_keeps_latest_of_a_repeated_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            [
                json.dumps({"kind": "train", "step": 2, "loss": 9.0}),
                json.dumps({"kind": "train", "step": 1, "loss": 1.0}),
                "not json",
                json.dumps({"kind": "train", "step": 2, "loss": 2.0}),  # resumed run re-logs step 2
                json.dumps({"kind": "val", "step": 2, "val_loss": 3.0}),
            ]
        )
    )
    train, val = read_log(log)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 1.0), (2, 2.0)]
    assert [r["val_loss"] for r in val] == [3.0]


def test_ema_is_identity_for_short_runs_and_smooths_long_ones():
    assert _ema([1.0, 5.0, 2.0]) == [1.0, 5.0, 2.0]
    noisy = [(-1.0) ** i for i in range(400)]
    smoothed = _ema(noisy)
    assert smoothed[0] == 1.0  # bias-corrected: starts at the first value, not at 0
    assert max(abs(v) for v in smoothed[100:]) < 0.1


def test_bench_table(tmp_path):
    rows = [
        {"setup": "no accumulation", "samples_per_second": 120.0, "open_clip_train": 118.0},
        {"setup": "accum-freq 8", "samples_per_second": 95.5, "open_clip_train": None},
    ]
    out = plot_bench_table(rows, "setup", ["samples_per_second", "open_clip_train"], tmp_path / "bench.png", "demo")
    assert_png(out)
