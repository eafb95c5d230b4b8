"""Non-finite steps: not applied, counted, and a run stuck on them stops with one line;
a device out of memory ends the run with one line naming the ways to fit.

A step whose loss or gradient norm is NaN or inf would spoil the weights for good, so its
gradient is dropped and the optimizer does not step (the step still counts: the schedule
and the data move on). fp16's GradScaler already skips a step whose scaled gradient
overflowed, and lowers its scale: that is its normal work, not a failure, so under fp16
only a non-finite loss counts. A checkpoint is never written with non-finite weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from bigbatch.config import BatchLayout, TrainConfig, evaluation_only
from bigbatch.errors import ConfigError
from bigbatch.runlog import log

LIKELY_CAUSES = ("likely causes: --lr too high (lower it, or set --grad-clip-norm), fp16 "
                 "overflow (--precision amp_bf16 or fp32), or bad data")


def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """A 0-dim bool on the loss's device (no host sync): the step must not be applied."""
    bad = ~torch.isfinite(loss)
    if grad_norm is not None:
        bad |= ~torch.isfinite(grad_norm.to(loss.device))
    return bad


class NonFiniteSteps:
    """Counts the steps not applied; after `limit` in a row (0: no limit) the run stops."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    def record(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        log.warning(f"step {step}: non-finite loss or gradient norm, step not applied "
                    f"({self.in_a_row} in a row, {self.total} in this run)")

    def stop_if_stuck(self, step: int) -> None:
        if self.limit and self.in_a_row >= self.limit:
            raise ConfigError(
                f"stopped at step {step}: the last {self.in_a_row} steps had a non-finite loss "
                f"or gradient and were not applied (--max-nonfinite-steps {self.limit}); "
                f"{LIKELY_CAUSES}; the last checkpoint holds the weights before them")


def nonfinite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (FSDP2: this rank's shards);
    one host sync for all of them."""
    names, flags = [], []
    for name, t in named.items():
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel():
            names.append(name)
            flags.append(~torch.isfinite(t).all())
    if not flags:
        return []
    bad = torch.stack([f.cpu() for f in flags]).tolist()
    return [name for name, b in zip(names, bad) if b]


def memory_advice(cfg: TrainConfig, layout: BatchLayout) -> tuple[str, str]:
    """(the setting that asked, what fits in less memory) for `out_of_memory_named`."""
    if evaluation_only(cfg):
        return f"--batch-size {layout.batch_size}", "lower --batch-size"
    auto = "" if cfg.batch_size == "auto" else ", or pass --batch-size auto"  # else chosen already
    return (f"--batch-size {layout.batch_size} x --accum-freq {layout.accum_freq}",
            f"lower --batch-size and raise --accum-freq alike (the same effective batch, the activations "
            f"of a smaller micro-batch), add --grad-checkpointing{auto} (bigbatch plan shows the peak of "
            f"each choice); a run that saved a checkpoint continues with --resume latest")


@contextlib.contextmanager
def out_of_memory_named(setting: str, fixes: str) -> Iterator[None]:
    """The device (or the host) out of memory: one line with what was asked, the `setting`
    that asked it and the `fixes`, instead of a traceback. A training start whose first step
    did not train leaves no run folder (rundir.claim_run_dir): the changed command runs again."""
    try:
        yield
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        lines = str(error).strip().splitlines() or [""]
        own = lines[-1] if lines[0].startswith("Caught ") else lines[0]  # a loader worker's: its own last line
        asked = ". ".join(own.split(". ")[:2]).strip()[:160]  # "CUDA out of memory. Tried to allocate 2.00 GiB"
        raise ConfigError(f"out of memory ({asked}) with {setting}: {fixes}") from None


def out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or "not enough memory" in str(error)
