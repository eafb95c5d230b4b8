"""--torchcompile: the model compiled in place, the engine's exactness kept.

Feature-cached accumulation replays each micro-batch's dropout in pass 2 by restoring the
random generators' states. Inductor draws its random numbers its own way (seeds per
compiled graph, and pass 1's no-grad graph is not pass 2's training graph), so it is told
to fall back to eager random ops (`fallback_random`): every mask then comes from the
replayed generators, exactly as without compile. The cost is one eager kernel per random
op (dropout, drop-path, patch dropout).

Micro-batch sizes: the first size compiles a static graph; a second size (an epoch's
smaller last micro-batch) recompiles once with a dynamic batch dimension, which then
serves every size. Per grad mode (pass 1 runs without grad) that is two compiles at most,
without padding, which would change the loss.

`model.compile()` keeps the module and its parameter names (no `_orig_mod.` prefix), so
checkpoints are the same with or without compile.
"""

from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module, backend: str = "inductor", dynamic: bool | None = None) -> nn.Module:
    """Compile `model`'s forward in place (returns it) so that pass 2 replays pass 1's masks.
    dynamic: torch.compile's (None: static first, dynamic after a second size)."""
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    model.compile(backend=backend, dynamic=dynamic)
    return model
