"""The progress line's numbers: samples/s of the steps alone, an ETA that does not swing."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bigbatch import runlog as runlog_module
from bigbatch.runlog import RunLog


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_evaluation_stays_out_of_the_rate_and_in_the_eta(tmp_path, monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(runlog_module, "time", SimpleNamespace(perf_counter=clock))  # this module's clock only
    run = RunLog(tmp_path, total_steps=20)
    caplog.set_level(logging.INFO, logger="bigbatch")

    def steps(first: int, last: int) -> None:
        for step in range(first, last + 1):
            clock.now += 1.0  # a step: 1 s, 64 samples
            run.train_step(step=step, epoch=1, loss=1.0, lr=1e-3, samples=64, data_seconds=0.1,
                           print_now=step % 5 == 0)

    steps(1, 5)
    with run.paused():  # an evaluation and a checkpoint inside it: 40 s
        clock.now += 30.0
        with run.paused():
            clock.now += 10.0
    steps(6, 10)

    rates = [r["samples_per_second"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert rates == [64.0, 64.0]  # not 64 * 5 / 45 after the pause
    etas = re.findall(r"ETA (\d+)m(\d+)s", caplog.text)
    # the steps left at the session's pace: since step 1 ended, 4 s over 4 steps, then 49 s over 9
    # (the pause included: evaluations recur)
    assert [int(m) * 60 + int(s) for m, s in etas] == [15 * 1, int(10 * 49 / 9)]


def test_the_first_line_leaves_the_start_up_out(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(runlog_module, "time", SimpleNamespace(perf_counter=clock))
    run = RunLog(tmp_path, total_steps=10)
    clock.now += 60.0  # loaders spawning, a compile, cuDNN's first plans: the first step's 60 s
    for step in range(1, 6):
        clock.now += 1.0
        run.train_step(step=step, epoch=1, loss=1.0, lr=1e-3, samples=64, data_seconds=0.5,
                       print_now=step == 5)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["samples_per_second"] == 64.0  # steps 2-5, not 5 * 64 / 65
    assert record["data_fraction"] == 0.5


def test_wandb_that_cannot_start_is_one_line(tmp_path):
    """No login (and no network): one line naming the fixes, not wandb's traceback. In a
    process of its own: a failed wandb.init leaves wandb's global state behind."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),  # no login anywhere
               PYTHONPATH=str(Path(runlog_module.__file__).parents[1]))
    code = ("from bigbatch.runlog import start_wandb\n"
            f"start_wandb({str(tmp_path)!r}, project='p', name='n', notes='', config={{}})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ConfigError: --report-to wandb: wandb could not start" in proc.stderr
    assert "WANDB_MODE=offline" in proc.stderr
