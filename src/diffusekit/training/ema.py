"""The exponential moving average of a model's weights, the weights a run samples with."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of a model's parameters, held in a frozen copy of the model."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        n = self.num_updates
        # warm-up: decay_n = min(decay, (1 + n) / (10 + n))   (as in TF's ExponentialMovingAverage)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:             # a frozen parameter (a LoRA's base) equals its copy already
                # ema = d * ema + (1 - d) * p
                ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1
