"""The command line forgives: one-line mistakes with the closest flag, --help without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bigbatch import cli
from bigbatch.cli import main
from bigbatch.parse import build_parser


@pytest.mark.parametrize("argv, flag", [
    (["train", "--acum-freq", "8"], "--accum-freq"),
    (["train", "--dataset-type", "synthetic", "--lr-imgae=1e-4"], "--lr-image"),
    (["eval", "--pretrianed", "x.pt"], "--pretrained"),
    (["export", "a.pt", "b.pt", "--emma"], "--ema"),
    (["plan", "--model", "bigbatch-tiny", "--gpu-memory", "8GiB", "--globl-batch-size", "64"],
     "--global-batch-size"),
    (["demo-data", "out", "--num-trian", "3"], "--num-train"),
])
def test_misspelled_flag_is_one_line_with_the_closest(capsys, argv, flag):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"did you mean {flag}?" in err
    assert err.startswith(f"bigbatch {argv[0]}: error: unknown flag")


def test_other_parse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--lr", "fast"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid float value: 'fast'" in err and "see bigbatch train --help" in err


def test_misspelled_command_gets_the_closest(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean train?" in err


@pytest.mark.parametrize("command", ["train", "eval", "export", "plan", "bench", "demo-data"])
def test_help_and_flag_mistakes_do_not_import_torch(command):
    """Parsing happens before torch (seconds to import) is; checked in a fresh interpreter."""
    probe = ("import sys\nfrom bigbatch.cli import main\n"
             f"for argv in (['{command}', '--help'], ['{command}', '--no-such-flag']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_bad_flag_combination_is_one_line_before_torch_is_imported():
    probe = ("import sys\nfrom bigbatch.cli import main\n"
             "code = main(['train', '--dataset-type', 'synthetic', '--resume', 'latest'])\n"
             "print(code, sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "2 []"
    assert done.stderr.count("\n") == 1 and "--resume latest continues a named run" in done.stderr


def test_train_help_has_no_glitches():
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "{,tensorboard}" not in text
    assert all(a.help.count("(default:") <= 1 for a in parser._actions), "a default given twice"
    assert "bigbatch-tiny" in text and "--threads" in text



def test_plan_flags_are_trains_where_they_share_a_meaning():
    """Same spelling, default and meaning: a flag copied from a plan into training keeps it."""
    from dataclasses import fields

    from bigbatch.config import TrainConfig
    from bigbatch.plan.command import build_parser as plan_parser

    train = {a.dest: a for a in build_parser()._actions}
    plan = {a.dest: a for a in plan_parser()._actions}
    # plan picks the micro-batch (auto) and derives K; its --device says where to estimate
    shared = set(train) & set(plan) - {"help", "batch_size", "accum_freq", "device"}
    assert {"model", "precision", "local_loss", "gather_with_grad", "loss_tile_size",
            "grad_checkpointing", "offload_inputs", "global_batch_size"} <= shared
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for dest in shared:
        assert plan[dest].option_strings == train[dest].option_strings, dest
        assert plan[dest].default == defaults[dest], dest
    assert "--tile-size" not in plan_parser().format_help()


def test_settling_the_heap_frees_garbage_first_and_leaves_the_collector_as_it_was():
    """Frozen objects are never collected: what is garbage must be freed (its finalizer run)
    before the freeze, and the collector must be left on (or off) as it was."""
    import gc
    import weakref

    from bigbatch import cli

    class Node:
        pass

    garbage = Node()
    garbage.cycle = garbage  # only the cyclic collector frees it
    freed = weakref.ref(garbage)
    del garbage
    try:
        cli.import_settled("bigbatch.errors")
        assert freed() is None and gc.isenabled()
        gc.disable()
        cli.import_settled("bigbatch.errors")
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()  # the rest of the suite runs with a normal heap


def test_python_m_bigbatch_exits_with_the_commands_status():
    done = subprocess.run([sys.executable, "-m", "bigbatch", "trian"], capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean train?" in done.stderr


def test_a_package_hidden_during_the_import_is_importable_again_after_it(tmp_path, monkeypatch):
    import importlib

    from bigbatch import cli

    (tmp_path / "optional_pkg.py").write_text("VALUE = 1\n")
    (tmp_path / "uses_optional.py").write_text(
        "try:\n    import optional_pkg\n    HAS = True\nexcept ImportError:\n    HAS = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.import_settled("uses_optional", ("optional_pkg",)).HAS is False
        assert importlib.import_module("optional_pkg").VALUE == 1
    finally:
        import gc
        gc.unfreeze()
        for name in ("uses_optional", "optional_pkg"):
            sys.modules.pop(name, None)


def test_torchvision_of_another_torch_is_one_line(capsys, monkeypatch):
    """A CPU torch beside a CUDA torchvision fails deep in open_clip's import, on an operator."""
    def importing(argv):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(cli, "_train", importing)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bigbatch: error: torchvision ")
    assert "(operator torchvision::nms does not exist): reinstall both from one index" in err


def test_a_rank_that_lost_another_is_one_line(capsys, monkeypatch):
    """gloo's error on the ranks that did not fail points to the one that did."""
    def peer_gone(argv):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:13706. "
                           "This is typically caused by a remote worker crashing.")

    monkeypatch.setattr(cli, "_train", peer_gone)
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == ("bigbatch: error: rank 0 lost its connection to another rank, which most likely ended first: "
                   "its error, above or in its out-RANK.log (--log-local), says why\n")
