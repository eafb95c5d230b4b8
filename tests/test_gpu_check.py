"""scripts/gpu_check.sh --smoke: every line of the GPU check runs on CPU before a GPU sees it.

Only that every part completes and reports its numbers, and how the parts share the device
(scripts/gpu_schedule.py); no time or speed is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_schedule  # noqa: E402


def test_gpu_check_smoke_runs_every_part_and_reports(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}
    every_part = "env,tests,bench,plan,capped,largest,peer_largest,compile,patchify,e2e"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--smoke",
                           "--parts", every_part], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == {
        name: "done" for name in every_part.split(",")}
    # the smoke's 1 GiB "card" packs the shared parts into two groups; the timed ones ran alone
    assert report["side_by_side"] == [["largest", "plan", "tests"], ["capped", "compile"]]
    assert parts["compile"]["beside"] == ["capped"] and parts["bench"]["beside"] == []
    shared = ("largest", "plan", "tests", "capped", "compile")
    bench_end = parts["bench"]["start_s"] + parts["bench"]["wall_seconds"]
    shared_end = max(parts[n]["start_s"] + parts[n]["wall_seconds"] for n in shared)
    assert all(parts[n]["start_s"] >= bench_end for n in shared)
    assert all(parts[n]["start_s"] >= shared_end for n in ("peer_largest", "patchify", "e2e"))
    assert parts["compile"]["waited_for_device_s"] >= 0
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
    assert all(r["largest_global_batch"] for r in parts["peer_largest"]["results"].values())
    assert parts["capped"]["result"]["under_cap"]
    assert "## Planner against measured peak" in (tmp_path / "gpu-check.md").read_text()
    assert (tmp_path / "gpu-check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# GPU check (smoke, CPU)" in proc.stdout


def test_shared_parts_are_packed_largest_first_into_the_memory():
    peaks = {"largest": 44, "plan": 26, "capped": 25, "compile": 14, "tests": 6}
    parts = ["tests", "plan", "capped", "largest", "compile"]
    assert gpu_schedule.pack(parts, peaks, 139.8) == [["largest", "plan", "capped", "compile", "tests"]]
    assert gpu_schedule.pack(parts, peaks, 79.6) == [["largest", "plan"], ["capped", "compile", "tests"]]
    assert gpu_schedule.pack(parts, peaks, 40) == [["largest"], ["plan", "tests"], ["capped"], ["compile"]]
    assert gpu_schedule.pack(parts, peaks, None) == [[p] for p in parts]  # one at a time


def test_an_exclusive_hold_waits_for_the_shared_ones(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import gpu_schedule; from pathlib import Path\n"
        "with gpu_schedule.device_lock(Path(sys.argv[2]), exclusive=False):\n"
        "    print('held', flush=True); time.sleep(2)"), str(ROOT / "scripts"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with gpu_schedule.device_lock(tmp_path, exclusive=False) as lock:  # shared beside shared: at once
        assert lock.make_exclusive() > 0.5  # then it waits for the other to let go
    assert holder.wait(timeout=30) == 0


def test_a_part_over_its_budget_is_stopped_with_what_it_started(tmp_path):
    child = tmp_path / "child.pid"
    sleeper = ("import subprocess, sys, time\n"
               f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    ran = gpu_schedule.run_group({"slow": [sys.executable, "-c", sleeper], "quick": [sys.executable, "-c", "pass"]},
                                 {"slow": 3, "quick": 30}, deadline=float("inf"), cwd=tmp_path)
    assert ran["slow"]["stopped"] == "stopped at its 3s budget" and ran["quick"]["stopped"] is None
    assert ran["slow"]["end"] - ran["slow"]["start"] < 30
    pid = int(child.read_text())
    for _ in range(50):  # the grandchild went with it (a zombie until its parent is reaped)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the part's child outlived it")
