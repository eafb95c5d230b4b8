"""Preemption: SIGTERM, SIGUSR1 (SLURM's `--signal`) and SIGINT end a run after the
current step with a mid-epoch checkpoint, instead of losing the epoch.

Before the first step there is nothing to save: a signal then stops the start at once
(StoppedEarly), wherever it is (scanning shards, building the model, loading weights).
From `deferred()` on, the handler only notes the signal; the loop reads `requested` once per step (the ranks
agree on it with the step's all-reduce), saves epoch_latest.pt and raises Preempted,
which the command turns into one line with the command that resumes and exit status
128 + the signal's number (SIGTERM 143, SIGUSR1 138, SIGINT 130). A second signal of the
same kind acts as it would without bigbatch (SIGINT: KeyboardInterrupt, SIGTERM: the
process ends), for when even the save must be cut short.

SLURM signals every process of a job step, loader workers too, and a worker that dies
makes the main process raise mid-step. Workers forked while the handlers are installed
inherit them, but torch's worker loop then sets its own SIGTERM handler, which exits:
`shield_loader_worker` as the loader's worker_init_fn leaves the decision to the main
process.
"""

from __future__ import annotations

import shlex
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """The run saved and stopped on a signal; `summary` is None on ranks other than 0."""

    def __init__(self, signum: int, summary: str | None, name: str):
        super().__init__(summary)
        self.signum, self.summary, self.name = signum, summary, name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StoppedEarly(BaseException):
    """A signal stopped the run before its first step: nothing to save. A BaseException, as
    KeyboardInterrupt is: raised wherever the start is, it must pass the `except Exception`
    of the code it interrupts (which would name another cause, or carry on)."""

    def __init__(self, signum: int):
        super().__init__(signum)  # picklable: ranks gather errors (evaluate._failing_together)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} before the first step: nothing was "
                f"trained or saved")


class SignalWatch:
    """A context manager for SIGNALS (main thread only: where Python runs handlers): until
    `deferred()` the first one raises StoppedEarly; after it, the first is noted for the
    loop to act on. The previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._deferred = False

    def deferred(self) -> None:
        """From now on a signal waits for the end of the step (the loop has begun)."""
        self._deferred = True

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _note(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        signal.signal(signum, self._previous[signum])  # the next one acts as usual
        if not self._deferred:
            raise StoppedEarly(signum)


def shield_loader_worker(worker_id: int | None = None) -> None:
    """A DataLoader worker_init_fn: the worker ignores the stop signals; the main process
    saves, stops, and ends its workers itself."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def resume_command(argv: list[str], name: str) -> str:
    """`bigbatch train ARGS --resume latest --name NAME`: the user's flags, minus any
    --resume/--name of theirs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume", "--name"):
            skip = True
        elif not arg.startswith(("--resume=", "--name=")):
            kept.append(arg)
    return shlex.join(["bigbatch", "train", *kept, "--resume", "latest", "--name", name])
