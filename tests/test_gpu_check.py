"""scripts/gpu_check.sh --smoke: every line of the GPU check runs on CPU before a GPU sees it.

Only that every part completes and reports its numbers; no time or speed is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_part_and_reports(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--smoke"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == {
        name: "done" for name in ("env", "tests", "bench", "plan", "capped", "largest", "compile", "patchify", "e2e")}
    whole_runs = parts["e2e"]["configs"]["b4x2 w1"]
    assert whole_runs["bigbatch csv"]["wall_ratio_to_peer"] > 0 and whole_runs["open_clip_train"]["wall_s"] > 0
    assert parts["compile"]["result"]["compiled_samples_per_s"] > 0
    assert "skipped" in parts["tests"]["summary"] or "passed" in parts["tests"]["summary"]
    run = parts["bench"]["runs"][0]
    assert run["configs"]["bigbatch accumulated"]["samples_per_s"] > 0
    assert run["profile"]["bigbatch accumulated"]["wall_s"] > 0 and run["phases"]["forward_nograd_micro_s"] > 0
    assert all(r["matrix product"] > 0 and r["cudnn"] > 0 for r in parts["patchify"]["results"])
    for row in parts["plan"]["configs"]:
        assert row["measured_bytes"] > 0 and abs(row["meta_error_percent"]) < 10
    assert all(r["largest_global_batch"] for r in parts["largest"]["results"].values())
    assert parts["capped"]["result"]["under_cap"]
    assert "## Planner against measured peak" in (tmp_path / "gpu-check.md").read_text()
    assert (tmp_path / "gpu-check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# GPU check (smoke, CPU)" in proc.stdout
