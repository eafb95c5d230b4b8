"""The CLI under torchrun, as a user launches it: two CPU ranks with gloo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

MODEL = str(Path(__file__).parent / "assets" / "test-clip.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "bigbatch", "--", "train", "--model", MODEL, "--device", "cpu", "--workers", "0",
            "--precision", "fp32", "--dataset-type", "synthetic", "--batch-size", "4",
            "--lr", "1e-3", "--warmup", "1", "--log-every-n-steps", "1",
            "--logs", str(tmp_path / "logs"), *args]


def launch(tmp_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun(tmp_path, *args, nproc=nproc), capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_two_ranks_train_log_once_and_resume(tmp_path):
    args = ["--name", "ddp", "--train-num-samples", "32", "--accum-freq", "2", "--epochs", "1",
            "--local-loss", "--gather-with-grad"]
    done = launch(tmp_path, *args)
    run_dir = tmp_path / "logs" / "ddp"
    assert "effective batch 16 = batch-size 4 x accum-freq 2 x world-size 2" in done.stdout
    assert done.stdout.count("effective batch 16") == 1  # only rank 0 prints
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2]  # 32 samples / (4 x 2 x 2)
    assert all(r["effective_batch"] == 16 for r in records)
    first = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (first["epoch"], first["step"]) == (1, 2) and len(first["rng"]) == 2

    done = launch(tmp_path, *args[:-4], "--epochs", "2", "--local-loss", "--gather-with-grad",
                  "--resume", "latest")
    assert "resumed from" in done.stdout
    second = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (second["epoch"], second["step"]) == (2, 4)


@pytest.mark.slow
def test_fsdp2_two_ranks_match_ddp(tmp_path):
    common = ["--train-num-samples", "16", "--accum-freq", "2", "--epochs", "1",
              "--gather-with-grad", "--force-patch-dropout", "0.0"]
    launch(tmp_path, *common, "--name", "ddp")
    launch(tmp_path, *common, "--name", "fsdp", "--fsdp")
    ddp = torch.load(tmp_path / "logs/ddp/checkpoints/epoch_latest.pt", weights_only=True)
    fsdp = torch.load(tmp_path / "logs/fsdp/checkpoints/epoch_latest.pt", weights_only=True)
    for key, value in ddp["state_dict"].items():
        assert_close(fsdp["state_dict"][key].reshape(value.shape), value, rtol=1e-4, atol=1e-6,
                     msg=lambda m, k=key: f"{k}: {m}")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others(tmp_path):
    cmd = torchrun(tmp_path, "--name", "dies", "--train-num-samples", "100000", "--epochs", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = tmp_path / "logs" / "dies" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text()) and time.time() < deadline:
        time.sleep(1)
    workers = _children(agent.pid)
    assert len(workers) == 2, "torchrun should have started two workers"
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies mid-run
    out, _ = agent.communicate(timeout=120)  # the others stop too: no silent hang
    assert agent.returncode != 0
    assert "SIGKILL" in out or "Signal 9" in out or "exitcode" in out
