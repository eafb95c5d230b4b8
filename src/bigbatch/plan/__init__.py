"""Memory planner: which micro-batch fits a GPU, and the peak memory of a training step.

`bigbatch plan` (and `--batch-size auto`) predict the peak GPU memory of one optimizer
step of `cached_backward` and pick the largest micro-batch that fits:

    sizes       batch arithmetic and memory strings (derive_accum_freq, parse_memory); no torch
    formula     the peak, term by term (PlanOptions, MemoryPlan, assemble)
    measure     one micro-batch's activations on fake tensors, no GPU (fused-SDPA shapes)
    probe       the same measured on a GPU (--device cuda)
    search      a plan for one layout (estimate_memory), the largest that fits (find_max_batch_size)
    report      the table a user reads and the fixes when a plan does not fit
    step_peak   the peak of a real training step, measured (the planner's check)
    command     `bigbatch plan`

The names below load their module on first use: `bigbatch plan --help` imports no torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "GiB": "sizes", "DEFAULT_RESERVE": "sizes", "derive_accum_freq": "sizes", "parse_memory": "sizes",
    "PlanOptions": "formula", "MemoryPlan": "formula",
    "estimate_memory": "search", "find_max_batch_size": "search", "inputs_must_wait_on_host": "search",
    "format_plan": "report", "no_fit_message": "report", "suggestions": "report",
    "measure_peak": "step_peak",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
