"""An exponential moving average of the weights, evaluated instead of them when on."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """ema <- decay * ema + (1 - decay) * weights, after every optimizer step.

    Buffers (BatchNorm statistics) are copied, not averaged. The copy lives on the
    model's device and in eval mode; it receives no gradients.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(self.module.parameters(), model.parameters()):
            ema.lerp_(live.detach(), 1 - self.decay)
        for ema, live in zip(self.module.buffers(), model.buffers()):
            ema.copy_(live)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
