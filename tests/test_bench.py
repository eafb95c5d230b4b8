"""Smoke tests of `bigbatch bench`: one tiny end-to-end run, and scripts/bench.py calling it.

Times are never asserted (DESIGN.md section 6): only that every number is produced.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bigbatch.bench.command import parse_args
from bigbatch.bench.runner import run
from bigbatch.bench.setups import ACCUM, PEER, PLAIN, PLAIN_MICRO
from script_loader import SCRIPTS


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()  # the script sets torch's global thread count
    yield 1
    torch.set_num_threads(threads)


def test_tiny_run_writes_json_markdown_and_plot(tmp_path, one_thread):
    args = parse_args([
        "--model", "bigbatch-tiny", "--device", "cpu", "--batch-size", "2", "--accum-freq", "2",
        "--steps", "2", "--warmup-steps", "1", "--threads", str(one_thread), "--out", str(tmp_path),
        "--loss-sizes", "32,64", "--loss-measure-max", "32"])
    result = run(args, log=lambda line: None)

    stem = tmp_path / "bench-cpu-bigbatch-tiny-b2x2"
    for suffix in (".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["environment"]["load_average_start"] is not None
    assert saved["environment"]["device_name"]

    configs = result["configs"]
    plain, plain_micro, accum = configs[PLAIN], configs[PLAIN_MICRO], configs[ACCUM]
    assert list(configs)[:3] == [PLAIN, PLAIN_MICRO, ACCUM]
    for row in (plain, plain_micro, accum):
        assert len(row["samples_per_s"]) == 2 and row["median_samples_per_s"] > 0
        assert row["memory"]["saved_peak_bytes"] > 0
        assert row["memory"]["live_peak_bytes"] >= row["memory"]["live_peak_before_optimizer_step_bytes"]
    assert plain["ratio_to_plain"] == 1.0 and accum["ratio_to_plain"] > 0
    assert plain_micro["ratio_to_plain_micro"] == 1.0 and accum["ratio_to_plain_micro"] > 0
    # the same micro-batch without accumulation keeps one micro-batch's activations too
    assert plain_micro["memory"]["saved_peak_bytes"] < plain["memory"]["saved_peak_bytes"]
    # K = 2: the plain step keeps both micro-batches' activations, accumulation one at a time
    assert plain["memory"]["saved_peak_bytes"] > accum["memory"]["saved_peak_bytes"]
    peer = configs[PEER]
    assert "error" in peer or (peer["median_samples_per_s"] > 0 and "speedup_vs_peer" in accum)

    rows = result["loss_working_set"]["rows"]
    assert rows[0]["plain"]["source"] == "measured" and rows[0]["plain"]["measured_bytes"] > 0
    assert rows[1]["plain"]["source"] != "measured"  # above --loss-measure-max: estimated only
    markdown = stem.with_suffix(".md").read_text()
    assert "| bigbatch accumulated | 2 x 2 |" in markdown and "| bigbatch plain per micro-batch | 2 (2 steps) |" in markdown
    # the ratio targets are judged at K = 4 only: here shown, not judged
    assert result["targets"]["bigbatch accumulated / plain per micro-batch >= 0.78 (set at K = 4)"]["met"] is None


def test_profile_at_any_accum_freq(tmp_path, one_thread):
    """--profile's pieces and one profiled step each, K = 1 included (no cached pass then)."""
    for k in (1, 2):
        args = parse_args([
            "--model", "bigbatch-tiny", "--device", "cpu", "--batch-size", "2", "--accum-freq", str(k),
            "--steps", "1", "--warmup-steps", "0", "--threads", str(one_thread), "--out", str(tmp_path),
            "--loss-sizes", "32", "--profile"])
        result = run(args, log=lambda line: None)
        assert ("forward_nograd_K_minus_1_micro_s" in result["phases"]) == (k > 1)
        assert result["phases"]["predicted_accum_s"] > 0
        for step in result["profile"].values():
            assert step["wall_s"] > 0 and step["host_async_copies"] == 0
        assert "| async copies |" in (tmp_path / f"bench-cpu-bigbatch-tiny-b2x{k}.md").read_text()


def test_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--batch-size", "--accum-freq", "--steps", "--warmup-steps",
                 "--precision", "--device", "--out", "--skip-peer", "--loss-sizes"):
        assert flag in out.stdout
