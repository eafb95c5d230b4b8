"""Smoke test of scripts/bench_e2e.py: one tiny round of whole CLI runs, every number produced,
the profile included (slow: tests/test_gpu_check.py runs the script without it by default).

Times are never asserted (DESIGN.md section 6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_loader import load_script

TINY = Path(__file__).parent / "assets" / "test-clip.json"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_e2e", "bench_e2e_script")


@pytest.mark.slow  # the default run has its smoke: gpu_check.sh --smoke's e2e part runs this script
def test_tiny_round_of_whole_runs_writes_json_markdown_plot_and_profile(bench, tmp_path):
    args = bench.parse_args(["--configs", "4x2x1", "--samples", "16", "--image-size", "16", "--epochs", "1",
                             "--pairs", "1", "--model-config", str(TINY), "--profile",
                             "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    result = bench.run(args, log=lambda line: None)

    for name in ("e2e-cpu.json", "e2e-cpu.md", "e2e-cpu.png", "e2e-profile-cpu.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "e2e-cpu.json").read_text())["environment"]["date"]
    config = result["configs"]["b4x2 w1"]
    for contender, runs in config["runs"].items():
        (run,) = runs
        assert "error" not in run, (contender, run)
        assert run["steps"] == 2 and run["batches"] >= 4  # 16 samples = 2 steps of 4 x 2
        assert run["wall_s"] > run["train_s"] > 0 and 0 <= run["data_share"] <= 1
    for contender in (bench.CSV, bench.WDS):
        assert config["summary"][contender]["wall_ratio_to_peer"]["median"] > 0
    phases = config["profile"]["phases"]
    in_wall = [v for k, v in phases.items() if not k.startswith(("of the wall", "beside"))]
    assert sum(in_wall) == pytest.approx(config["profile"]["wall_s"])
    assert phases["pass 1"] > 0 and phases["pass 2"] > 0 and phases["checkpoint"] > 0
    assert "| b4x2 w1 | bigbatch csv |" in (tmp_path / "out" / "e2e-cpu.md").read_text()
