"""Faults a long run meets: non-finite steps, preemption signals, full or shared run
folders, unreadable configs and checkpoints. Each ends in a usable state and one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bigbatch.step
import bigbatch.train
from bigbatch import faults, rundir
from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.preemption import resume_command, shield_loader_worker

MODEL = str(Path(__file__).parent / "assets" / "test-clip.json")
FAST = ["--model", MODEL, "--workers", "0", "--precision", "fp32", "--device", "cpu",
        "--lr", "1e-3", "--warmup", "2", "--log-every-n-steps", "1"]
SYNTH = ["--dataset-type", "synthetic", "--train-num-samples", "40", "--batch-size", "4",
         "--accum-freq", "2", "--epochs", "2", "--force-patch-dropout", "0.5"]  # 5 steps an epoch
SRC = str(Path(bigbatch.train.__file__).parents[1])


def train_args(tmp_path: Path, *args: str, name: str = "run") -> list[str]:
    return ["train", *FAST, "--logs", str(tmp_path / "logs"), "--name", name, *args]


def checkpoint(tmp_path: Path, name: str = "run", file: str = "epoch_latest.pt") -> dict:
    return torch.load(tmp_path / "logs" / name / "checkpoints" / file, weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bigbatch: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def send_after_step(monkeypatch, signum: int, at_step: int) -> None:
    """The process signals itself inside the optimizer step `at_step`: the loop sees it at
    the next step's check, trains that step, saves and stops."""
    step = bigbatch.train.optimizer_step
    calls = []

    def stepping_then_signalled(*a, **kw):
        step(*a, **kw)
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(bigbatch.train, "optimizer_step", stepping_then_signalled)


# --- non-finite steps

def test_nonfinite_steps_are_not_applied_counted_and_stop_the_run(tmp_path, capsys):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "64", "--batch-size", "8",
            "--epochs", "2", "--lr", "1e6", "--warmup", "1", "--save-every-n-steps", "1",
            "--max-nonfinite-steps", "3"]
    assert main(train_args(tmp_path, *args)) == 2  # the loss is NaN from step 2 on
    err = one_error_line(capsys)
    assert "stopped at step 4" in err and "--lr too high" in err and "fp16" in err
    lines = (tmp_path / "logs" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [r["nonfinite_steps"] for r in map(json.loads, lines)] == [0, 1, 2, 3]
    out_log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "step not applied" in out_log and "bigbatch: error: stopped at step 4" in out_log
    state = checkpoint(tmp_path)  # saved after each skipped step: the weights of step 1
    assert state["step"] == 3 and all_finite(state)


def test_a_checkpoint_is_never_written_with_nonfinite_weights(tmp_path, monkeypatch, capsys):
    step = bigbatch.train.optimizer_step
    calls = []

    def step_then_poison(model, *a, **kw):  # what a finite but overflowing update would do
        step(model, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                model.text_projection.fill_(float("inf"))

    monkeypatch.setattr(bigbatch.train, "optimizer_step", step_then_poison)
    assert main(train_args(tmp_path, *SYNTH, "--save-every-n-steps", "1")) == 2
    err = one_error_line(capsys)
    assert "not writing a checkpoint" in err and "text_projection" in err
    assert checkpoint(tmp_path)["step"] == 1 and all_finite(checkpoint(tmp_path))
    assert not list((tmp_path / "logs" / "run" / "checkpoints").glob(".*"))


def test_a_skipped_step_under_the_grad_scaler_leaves_it_ready_for_the_next_step():
    """fp16: the scaler still lowers its scale after a skipped step, and unscales again."""
    model = torch.nn.Linear(2, 1)
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = model.weight.detach().clone()
    for factor in (float("nan"), 1.0):
        loss = model(torch.ones(1, 2)).sum() * factor
        scaler.scale(loss).backward()
        grad_norm = bigbatch.step.unscale_and_clip(model, optimizer, scaler, None)
        skip = bool(faults.nonfinite(loss.detach(), None))  # gradient overflow is the scaler's business
        bigbatch.step.optimizer_step(model, optimizer, scaler, apply=not skip)
        assert torch.equal(model.weight, before) == skip and model.weight.grad is None
        before = model.weight.detach().clone()
    assert scaler.get_scale() == 512.0 and torch.isfinite(grad_norm)


# --- preemption

@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_mid_epoch_and_names_the_resume_command(tmp_path, monkeypatch, capsys, signum):
    before = signal.getsignal(signum)
    send_after_step(monkeypatch, signum, at_step=1)
    assert main(train_args(tmp_path, *SYNTH)) == 128 + signum
    err = one_error_line(capsys)
    assert f"stopped by {signal.Signals(signum).name} after step 2" in err
    assert err.rstrip().endswith("--resume latest --name run")
    state = checkpoint(tmp_path)
    assert (state["epoch"], state["step"], state["epoch_samples"]) == (0, 2, 16)
    assert signal.getsignal(signum) == before  # the handlers are given back


@pytest.mark.parametrize("where", ["build_teacher", "announce"])  # before and after the run folder is made
def test_a_signal_before_the_first_step_stops_at_once_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys,
                                                                                where):
    """Nothing is trained yet, so nothing waits for a step: the start ends where the signal
    finds it (here while building, or once the run folder exists), and the same command
    then runs as if it had never started."""
    original = getattr(bigbatch.train, where)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(bigbatch.train, where, signalled)
        assert main(train_args(tmp_path, *SYNTH)) == 143
    assert "stopped by SIGTERM before the first step" in one_error_line(capsys)
    assert not (tmp_path / "logs" / "run").exists()
    assert main(train_args(tmp_path, *SYNTH, "--epochs", "1")) == 0


def test_stopped_early_passes_broad_handlers_and_crosses_ranks():
    """Raised wherever the start is, it must not be taken for the error of the code it
    interrupts (`except Exception` there), and ranks gather errors by pickling them."""
    import pickle

    from bigbatch.preemption import StoppedEarly

    assert not issubclass(StoppedEarly, Exception)
    copy = pickle.loads(pickle.dumps(StoppedEarly(signal.SIGTERM)))
    assert (copy.exit_code, str(copy)) == (143, str(StoppedEarly(signal.SIGTERM)))


def test_a_start_that_fails_leaves_no_run_folder_to_resume(tmp_path, capsys):
    """A checkpoint that cannot be read is found only once the run folder exists: the
    folder goes with the failed start, so the command without --resume is not refused."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(train_args(tmp_path, *SYNTH, "--resume", str(garbage))) == 2
    one_error_line(capsys)
    assert not (tmp_path / "logs" / "run").exists()
    assert main(train_args(tmp_path, *SYNTH, "--epochs", "1")) == 0


@pytest.mark.parametrize("at_step", [1, 3])
def test_out_of_memory_is_one_line_and_a_first_step_leaves_no_run_folder(tmp_path, monkeypatch, capsys, at_step):
    """Out of memory in the first step (the usual place) ends the start as a bad flag does:
    one line naming the fixes, no run folder, the changed command runs. Later, the run's
    folder and its checkpoints stay for --resume latest."""
    backward = bigbatch.train.cached_backward
    calls = []

    def running_out(*a, **kw):
        calls.append(1)
        if len(calls) == at_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
        return backward(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(bigbatch.train, "cached_backward", running_out)
        assert main(train_args(tmp_path, *SYNTH, "--save-every-n-steps", "1")) == 2
    err = one_error_line(capsys)
    assert "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB) with --batch-size 4 x --accum-freq 2" in err
    assert "--grad-checkpointing" in err and "--batch-size auto" in err
    if at_step == 1:
        assert not (tmp_path / "logs" / "run").exists()
        assert main(train_args(tmp_path, *SYNTH, "--epochs", "1")) == 0
    else:
        assert checkpoint(tmp_path)["step"] == at_step - 1
        assert "out of memory" in (tmp_path / "logs" / "run" / "out.log").read_text()


def test_a_damaged_latest_checkpoint_names_the_newest_readable_one(tmp_path, capsys):
    """epoch_latest.pt is a second name of the last epoch_N.pt: damaged in place, both are,
    and --resume latest names the one before, which resumes."""
    short = [*SYNTH, "--train-num-samples", "16"]  # 2 steps an epoch
    assert main(train_args(tmp_path, *short)) == 0
    directory = tmp_path / "logs" / "run" / "checkpoints"
    latest = directory / "epoch_latest.pt"
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size // 2)
    capsys.readouterr()
    assert main(train_args(tmp_path, *short, "--epochs", "3", "--resume", "latest")) == 2
    older = directory / "epoch_1.pt"
    assert f"it is damaged or not a torch checkpoint; pick another file (this run's newest other one: " \
           f"--resume {older})" in one_error_line(capsys)
    assert main(train_args(tmp_path, *short, "--epochs", "3", "--resume", str(older))) == 0
    assert checkpoint(tmp_path)["epoch"] == 3


def test_an_evaluation_that_fails_loses_no_training(tmp_path, monkeypatch, capsys):
    """The epoch's checkpoint is written before its evaluation (ImageNet zero-shot can take
    minutes and run out of memory): the run resumes after the epoch, not before it."""
    def running_out(self, state, runlog):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(bigbatch.train.Evaluation, "after_epoch", running_out)
        assert main(train_args(tmp_path, *SYNTH, "--train-num-samples", "16")) == 2
    assert "out of memory" in one_error_line(capsys)
    assert (checkpoint(tmp_path)["epoch"], checkpoint(tmp_path)["step"]) == (1, 2)
    assert main(train_args(tmp_path, *SYNTH, "--train-num-samples", "16", "--resume", "latest")) == 0
    assert (checkpoint(tmp_path)["epoch"], checkpoint(tmp_path)["step"]) == (2, 4)


def test_out_of_memory_in_a_loader_worker_is_its_own_line_and_auto_is_not_advised_twice():
    from bigbatch.config import BatchLayout
    from bigbatch.parse import parse_config

    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          "call last):\n  File ...\nRuntimeError: DefaultCPUAllocator: not enough memory: you "
                          "tried to allocate 123 bytes.")
    cfg = parse_config(["--batch-size", "auto", "--dataset-type", "synthetic"])
    with pytest.raises(ConfigError) as error, faults.out_of_memory_named(*faults.memory_advice(cfg, BatchLayout(8, 2, 1))):
        raise worker
    message = str(error.value)
    assert "\n" not in message and "Caught" not in message
    assert message.startswith("out of memory (RuntimeError: DefaultCPUAllocator: not enough memory: you tried to "
                              "allocate 123 bytes.) with --batch-size 8 x --accum-freq 2: ")
    assert "--grad-checkpointing" in message and "--batch-size auto" not in message
    with pytest.raises(ValueError, match="^unrelated$"), faults.out_of_memory_named("x", "y"):
        raise ValueError("unrelated")


def test_resume_command_replaces_the_users_resume_and_name():
    argv = ["--name", "old", "--lr", "1e-3", "--resume=x.pt", "--logs", "my logs"]
    assert resume_command(argv, "old") == ("bigbatch train --lr 1e-3 --logs 'my logs' "
                                           "--resume latest --name old")


CHILD = """
import sys
from bigbatch.cli import main
from bigbatch.runlog import RunLog

train_step = RunLog.train_step

def wait_for_the_parent(self, **kw):  # after step 1: the parent signals, then writes a line
    train_step(self, **kw)
    if kw["step"] == 1:
        print("READY", flush=True)
        sys.stdin.readline()

RunLog.train_step = wait_for_the_parent
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_from_outside_then_resume_equals_the_uninterrupted_run(tmp_path):
    """A real SIGTERM from another process to the trainer and its loader workers (as SLURM
    signals every process of the job), between two steps of the first epoch."""
    args = [*SYNTH, "--workers", "2"]
    assert main(train_args(tmp_path, *args, name="whole")) == 0

    child = subprocess.Popen([sys.executable, "-c", CHILD, *train_args(tmp_path, *args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": SRC}, start_new_session=True)
    for line in child.stdout:
        if line.strip() == "READY":
            break
    os.killpg(child.pid, signal.SIGTERM)  # the trainer and its workers
    _, err = child.communicate("\n", timeout=120)
    assert child.returncode == 143, err
    assert "stopped by SIGTERM after step 2" in err and "--resume latest --name run" in err
    assert checkpoint(tmp_path)["epoch_samples"] == 16

    assert main(train_args(tmp_path, *args, "--resume", "latest")) == 0
    assert_same_weights(checkpoint(tmp_path, "whole"), checkpoint(tmp_path))


@pytest.mark.parametrize("last_step", [4, pytest.param(5, marks=pytest.mark.slow)])
def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, last_step):
    """Stopped inside the first epoch (step 4 of 5) or at its last step."""
    assert main(train_args(tmp_path, *SYNTH, name="whole")) == 0
    with monkeypatch.context() as patch:
        send_after_step(patch, signal.SIGTERM, at_step=last_step - 1)
        assert main(train_args(tmp_path, *SYNTH)) == 143
    assert checkpoint(tmp_path)["epoch_samples"] == last_step * 8
    assert main(train_args(tmp_path, *SYNTH, "--resume", "latest")) == 0
    assert_same_weights(checkpoint(tmp_path, "whole"), checkpoint(tmp_path))


def test_a_shielded_loader_worker_outlives_a_signal_to_every_process():
    """SLURM signals the loader workers too; shielded, they keep serving the main process."""
    loader = torch.utils.data.DataLoader(range(40), batch_size=2, num_workers=1,
                                         worker_init_fn=shield_loader_worker)
    batches = iter(loader)
    first = next(batches)  # the worker is up (unshielded, it would die and the loop raise)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
    assert torch.cat([first, *batches]).tolist() == list(range(40))



CRASHING_CHILD = """
import sys
import bigbatch.train
from bigbatch.cli import entry
step = bigbatch.train.optimizer_step
def a_bug(*args, **kwargs):
    if a_bug.calls == 2:
        raise RuntimeError("a bug at step 3")
    a_bug.calls += 1
    return step(*args, **kwargs)
a_bug.calls = 0
bigbatch.train.optimizer_step = a_bug
sys.argv[0] = "bigbatch"
entry()
"""


def test_a_bug_mid_run_ends_the_process_with_its_traceback_instead_of_hanging(tmp_path):
    """A traceback keeps the loader's persistent workers alive until exit, and they ignore
    multiprocessing's SIGTERM (shielded): without closing them first, exit waits forever."""
    done = subprocess.run([sys.executable, "-c", CRASHING_CHILD,
                           *train_args(tmp_path, *SYNTH, "--workers", "2")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 1 and "RuntimeError: a bug at step 3" in done.stderr, done.stderr


# --- the run folder

def test_a_run_folder_in_use_is_refused_and_freed_when_its_process_ends(tmp_path, capsys):
    run_dir = tmp_path / "logs" / "run"
    args = train_args(tmp_path, "--dataset-type", "synthetic", "--train-num-samples", "8",
                      "--batch-size", "4", "--epochs", "1", "--resume", "latest")
    with rundir.claimed(run_dir, str(tmp_path / "logs")):
        assert main(args) == 2
    err = one_error_line(capsys)
    assert f"run folder {run_dir} is in use by another training process (pid {os.getpid()})" in err
    # a process killed while holding the lock: the OS releases it
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(run_dir / rundir.LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    stale = run_dir / "checkpoints" / ".epoch_latest.pt.tmp"
    stale.write_bytes(b"torn")  # what a save killed mid-write leaves
    assert main(args) == 0
    assert not stale.exists() and checkpoint(tmp_path)["step"] == 2


def test_logs_that_cannot_hold_a_run_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "logs").write_text("a file, not a folder")
    assert main(train_args(tmp_path, "--dataset-type", "synthetic")) == 2
    err = one_error_line(capsys)
    assert f"--logs {tmp_path / 'logs'}: cannot write the run folder" in err and "writable folder" in err


def test_a_read_only_logs_folder_is_one_line(tmp_path, monkeypatch):
    def read_only(self, *a, **kw):  # as root, chmod cannot make a folder read-only
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"--logs /mnt/ro: cannot write the run folder "
                                          r"/mnt/ro/run \(Read-only file system\): pass --logs"):
        with rundir.claimed(Path("/mnt/ro/run"), "/mnt/ro"):
            pass


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch,
                                                                            capsys):
    save, calls = torch.save, []

    def disk_full_at_the_second_save(state, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(state, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_save)
    assert main(train_args(tmp_path, *SYNTH, "--save-every-n-steps", "1")) == 2
    err = one_error_line(capsys)
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert "epoch_latest.pt" in err and "untouched" in err
    assert checkpoint(tmp_path)["step"] == 1
    assert not list((tmp_path / "logs" / "run" / "checkpoints").glob(".*"))


def test_a_full_disk_while_logging_is_one_line():
    with pytest.raises(ConfigError, match=r"cannot write logs/r/metrics.jsonl \(No space"):
        with rundir.disk_errors_named("logs"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "logs/r/metrics.jsonl")
    with pytest.raises(FileNotFoundError):  # other errors are not the disk's
        with rundir.disk_errors_named("logs"):
            raise FileNotFoundError(errno.ENOENT, "missing", "x")


# --- messages

class Opaque:
    """Any Python object in a checkpoint: loading it would run code."""


def test_a_checkpoint_that_pickles_code_is_refused_in_one_line(tmp_path, capsys):
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "extra": Opaque(), "optimizer": {}}, pickled)
    for flag in ("--pretrained", "--resume"):
        assert main(train_args(tmp_path, "--dataset-type", "synthetic", flag, str(pickled),
                               name=flag.strip("-"))) == 2
        err = one_error_line(capsys)
        assert str(pickled) in err and "pickled Python objects" in err and "re-save" in err


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Under torchrun, SIGUSR1 to rank 1 only: the ranks agree, rank 0 saves, all exit 138."""
    from test_launch import _children, torchrun

    cmd = torchrun(tmp_path, "--name", "ddp", "--train-num-samples", "100000", "--epochs", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in agent.stdout:
        if "step 2/" in line:
            break
    os.kill(_children(agent.pid)[1], signal.SIGUSR1)
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode != 0 and "exitcode  : 138" in out, out[-3000:]
    assert out.count("bigbatch: stopped by SIGUSR1 after step") == 1, out[-3000:]
    state = torch.load(tmp_path / "logs" / "ddp" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert state["epoch_samples"] == state["step"] * 4 * 2


def test_resume_with_a_stateless_optimizer_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """SGD without momentum keeps no state per parameter: only its groups to restore."""
    sgd = [*SYNTH, "--opt", "sgd", "--lr", "0.05"]
    assert main(train_args(tmp_path, *sgd, name="whole")) == 0
    with monkeypatch.context() as patch:
        send_after_step(patch, signal.SIGTERM, at_step=2)
        assert main(train_args(tmp_path, *sgd)) == 143
    assert main(train_args(tmp_path, *sgd, "--resume", "latest")) == 0
    assert_same_weights(checkpoint(tmp_path, "whole"), checkpoint(tmp_path))
