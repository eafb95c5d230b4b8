"""`bigbatch` command: train, eval, export, plan, bench, demo-data.

A mistake a user can make (bad flag, missing file, wrong checkpoint) ends with one
line `bigbatch: error: ...` naming the fix and exit status 2, not a traceback.
"""

from __future__ import annotations

import difflib
import gc
import importlib
import os
import sys

USAGE = """usage: bigbatch COMMAND [options]

commands:
  train       train a CLIP-style model (bigbatch train --help)
  eval        zero-shot classification and retrieval of a checkpoint (bigbatch eval --help)
  export      write a plain open_clip checkpoint from a training one (bigbatch export CKPT OUT)
  plan        micro-batch, accum-freq and predicted peak memory (bigbatch plan --help)
  bench       the step benchmark against a plain step and open_clip_train (bigbatch bench --help)
  demo-data   write the procedurally drawn shapes dataset (bigbatch demo-data DIR)
"""


def main(argv: list[str] | None = None) -> int:
    # torchrun's parser mistakes our --logs for an abbreviation of its --logs-specs unless
    # our arguments follow a bare '--', which then reaches us: drop it
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "eval": _module_main("bigbatch.eval_cli"),
                "export": _module_main("bigbatch.export"), "plan": _module_main("bigbatch.plan.command"),
                "bench": _module_main("bigbatch.bench.command"),
                "demo-data": _module_main("bigbatch.demo_data")}
    if command not in commands:
        close = difflib.get_close_matches(command, commands, n=1)
        hint = f": did you mean {close[0]}?" if close else ""
        print(f"bigbatch: error: unknown command {command!r}{hint} (see bigbatch --help)", file=sys.stderr)
        return 2
    from bigbatch.preemption import Preempted, StoppedEarly, resume_command
    try:
        return commands[command](rest) or 0
    except Preempted as stop:  # rank 0 says it; every rank exits 128 + the signal
        if stop.summary:
            print(f"bigbatch: {stop.summary}; resume with: {resume_command(rest, stop.name)}",
                  file=sys.stderr)
        return stop.exit_code
    except StoppedEarly as stop:  # every rank stops; rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"bigbatch: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("bigbatch: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = (str(error) if isinstance(error, user_errors())
                   else mismatched_torchvision(error) or lost_another_rank(error))
        if message is None:
            raise
        print(f"bigbatch: error: {message}", file=sys.stderr)
        return 2


def entry() -> None:
    """`bigbatch` and `python -m bigbatch`: main, then exit with its status."""
    status = main()
    settle()  # the shutdown's own collection then skips what is long-lived (see import_settled)
    sys.exit(status)


def mismatched_torchvision(error: Exception) -> str | None:
    """torchvision built for another torch (pip mixed a CPU and a CUDA index, or two
    releases) fails at import, deep in open_clip, on an operator: say what to reinstall."""
    if not (isinstance(error, RuntimeError) and "torchvision::" in str(error)):
        return None
    from importlib.metadata import version
    torch, vision = version("torch"), version("torchvision")
    return (f"torchvision {vision} does not fit torch {torch} ({str(error).splitlines()[0][:80]}): "
            f"reinstall both from one index, e.g. pip install --force-reinstall torch=={torch.split('+')[0]} "
            f"torchvision (pip picks the torchvision of that torch; for CPU wheels add --index-url "
            f"https://download.pytorch.org/whl/cpu)")


def lost_another_rank(error: Exception) -> str | None:
    """gloo's "Connection closed by peer": the consequence on this rank of another rank's
    end, whose own error (above, or in its log) is the cause; no traceback of this one."""
    if not any(words in str(error) for words in ("Connection closed by peer", "Connection reset by peer")):
        return None
    return (f"rank {os.environ.get('RANK', '?')} lost its connection to another rank, which most likely "
            f"ended first: its error, above or in its out-RANK.log (--log-local), says why")


def user_errors() -> tuple[type[Exception], ...]:
    """Mistakes a user can make: one line, no traceback. The data layer's error is looked
    up only where the data layer was imported (it imports torch: a flag mistake caught
    before then answers at once)."""
    from bigbatch.errors import ConfigError
    data = sys.modules.get("bigbatch.data")
    return (ConfigError, data.DataError) if data is not None else (ConfigError,)


def _train(argv: list[str]) -> int:
    from bigbatch.config import wants_report
    from bigbatch.parse import parse_config

    cfg = parse_config(argv)  # flags first: --help and mistakes need no torch
    # timm imports wandb, when installed, for a summary helper bigbatch never calls (0.3 s)
    unused = () if wants_report(cfg, "wandb") else ("wandb",)
    import_settled("bigbatch.train", unused).train(cfg)
    return 0


def _module_main(module: str):
    """The command's `main(argv)`, imported only when it runs (torch imports are slow)."""
    def run(argv: list[str]) -> int:
        return import_settled(module).main(argv) or 0
    return run


def import_settled(module: str, unused: tuple[str, ...] = ()):
    """Import a command's module (torch, torchvision, open_clip: ~700k objects that live
    until exit) with the cyclic garbage collector paused, then freeze what it left.
    Packages named `unused` look absent to the libraries' optional imports meanwhile.

    Otherwise the collector walks them all in every full pass: ~7 passes while importing
    (0.6 s on a CPU) and one more as the interpreter shuts down (1 s). Imports leave little
    cyclic garbage. Frozen before the loader workers fork, their pages also stay shared."""
    paused = gc.isenabled()
    gc.collect()  # before, so that no garbage is frozen (cheap: little is unfrozen yet)
    gc.disable()
    hidden = [name for name in unused if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # None there: `import name` raises ImportError
    try:
        return importlib.import_module(module)
    finally:
        for name in hidden:
            del sys.modules[name]
        gc.freeze()
        if paused:
            gc.enable()


def settle() -> None:
    """Collect what is garbage (its finalizers run), then freeze what is left."""
    gc.collect()
    gc.freeze()
