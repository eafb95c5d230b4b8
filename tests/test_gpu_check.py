"""scripts/gpu_check.sh --smoke: every line of the GPU check runs on CPU before a GPU sees it.

Only that every part completes and reports its numbers, and how the parts share the device
(scripts/gpu_schedule.py); no time or speed is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_schedule  # noqa: E402


def test_gpu_check_smoke_runs_every_part_and_reports(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}
    every_part = "env,tests,bench,plan,capped,largest,peer_largest,compile,patchify,compile_ratio,e2e"
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
    first_end = max(parts[n]["start_s"] + parts[n]["wall_seconds"] for n in ("env", "bench", "peer_largest"))
    shared_end = max(parts[n]["start_s"] + parts[n]["wall_seconds"] for n in shared)
    assert all(parts[n]["start_s"] >= first_end for n in shared)
    assert all(parts[n]["start_s"] >= shared_end for n in ("patchify", "compile_ratio", "e2e"))
    # compile timed only once capped (beside it) had let the device go
    assert parts["compile"]["exclusive_since"] >= parts["capped"]["released_at"]
    whole_runs = parts["e2e"]["configs"]["b4x2 w1"]
    assert whole_runs["bigbatch csv"]["wall_ratio_to_peer"] > 0 and whole_runs["open_clip_train"]["wall_s"] > 0
    assert parts["compile"]["result"]["compiled_samples_per_s"] > 0
    assert parts["compile_ratio"]["result"]["ratio_compiled"] > 0
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
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert "## Planner against measured peak" in markdown and "| accumulated / plain |" in markdown
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
        "with gpu_schedule.device_lock(Path(sys.argv[2]), exclusive=False) as lock:\n"
        "    print('held', flush=True); sys.stdin.readline()\n"
        "print(lock.releasing_at, flush=True)"), str(ROOT / "scripts"), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with gpu_schedule.device_lock(tmp_path, exclusive=False) as lock:  # shared beside shared: at once
        threading.Timer(0.5, lambda: (holder.stdin.write("go\n"), holder.stdin.flush())).start()
        lock.make_exclusive()  # then it waits for the other to let go
        assert lock.exclusive_since >= float(holder.stdout.readline())
    assert holder.wait(timeout=60) == 0


def test_a_part_over_its_budget_is_stopped_with_what_it_started(tmp_path):
    child = tmp_path / "child.pid"
    sleeper = ("import subprocess, sys, time\n"
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
               f"open({str(child)!r} + '.partial', 'w').write(str(p.pid))\n"
               f"import os; os.replace({str(child)!r} + '.partial', {str(child)!r}); time.sleep(600)")
    ran = gpu_schedule.run_group({"slow": [sys.executable, "-c", sleeper], "quick": [sys.executable, "-c", "pass"]},
                                 {"slow": 20, "quick": 300}, deadline=float("inf"), cwd=tmp_path)
    assert ran["slow"]["stopped"] == "stopped at its 20s budget" and ran["quick"]["stopped"] is None
    assert ran["slow"]["end"] - ran["slow"]["start"] < 300
    assert child.is_file(), "the part did not start its child within its budget (a very loaded machine)"
    assert not alive(int(child.read_text())), "the part's child outlived it"


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its reaper, counts as gone)."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_the_largest_search_shows_both_sides_of_the_limit(tmp_path, monkeypatch):
    import gpu_check

    def step(cfg, kind, n):  # a card on which 40 samples fit
        if n > 40:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.01, n

    monkeypatch.setattr(gpu_check, "one_big_step", step)

    def search(start: int, cap: int = 1024, beside=()) -> dict:
        cfg = {"largest_start": {gpu_check.PEER: start}, "largest_cap": cap, "beside": list(beside)}
        rec = gpu_check.Recorder(tmp_path / "part.json")
        gpu_check.largest_batch(cfg, rec, gpu_check.PEER, budget=100)
        result = rec.data["results"][gpu_check.PEER]
        return {"tried": [t["global_batch"] for t in result["trials"]], "largest": result.get("largest_global_batch"),
                "stopped": result["stopped"]}

    assert search(8) == {"tried": [8, 16, 32, 64], "largest": 32, "stopped": "out of memory at 64"}
    # a start beyond the limit is halved until a step completes
    assert search(128) == {"tried": [128, 64, 32], "largest": 32, "stopped": "out of memory at 64"}
    assert search(8, cap=16) == {"tried": [8, 16], "largest": 16, "stopped": "reached the cap 16"}
    # beside other parts, running out of memory may be theirs
    assert "beside plan (theirs, maybe: not the card's limit)" in search(8, beside=["plan"])["stopped"]
