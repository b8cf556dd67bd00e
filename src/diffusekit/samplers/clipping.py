"""Bounding x0_pred before each update: clipping (diffusers' clip_sample) and dynamic thresholding (Imagen).

A sampler applies these to every prediction it receives, whatever wraps the network (guidance
included), so the bound acts on the guided x0_pred exactly where diffusers' scheduler.step does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..config import ConfigError
from ..schedule import as_batch, eps_from_x0
from .denoiser import Denoiser, Prediction

# the options besides clip_sample, with their defaults (diffusers' names and defaults)
BOUND_OPTIONS = dict(clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                     use_clipped_model_output=True)


@dataclass(frozen=True)
class X0Bounds:
    """How x0_pred is bounded before a sampler's update.

    thresholding (Saharia et al. 2022, "Imagen", sec. 2.3) takes precedence over clip_sample, as in
    diffusers. use_clipped_model_output: True re-derives eps from the bounded x0_pred (the update is
    then consistent with it); False keeps the network's eps in the update and bounds x0_pred alone,
    which is what diffusers' DDIMScheduler does unless the call passes use_clipped_model_output=True.
    """
    clip_sample: bool = False
    clip_sample_range: float = 1.0       # x0_pred is clamped to [-clip_sample_range, clip_sample_range]
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995   # the quantile of |x0_pred| per image that sets the bound s
    sample_max_value: float = 1.0        # s is clamped to [1, sample_max_value]
    use_clipped_model_output: bool = True

    def __post_init__(self):
        if not float(self.clip_sample_range) > 0:
            raise ConfigError(f"clip_sample_range={self.clip_sample_range!r}; give a positive bound such as 1.0 "
                              "(x0_pred is clamped to [-range, range]).")
        if not 0 < float(self.dynamic_thresholding_ratio) <= 1:
            raise ConfigError(f"dynamic_thresholding_ratio={self.dynamic_thresholding_ratio!r}; give a quantile in "
                              "(0, 1], such as 0.995.")

    @property
    def active(self) -> bool:
        return bool(self.clip_sample or self.thresholding)

    def changed(self) -> dict:
        """The options that differ from the defaults (for repr and configs)."""
        defaults = X0Bounds()
        return {k: v for k, v in asdict(self).items() if v != getattr(defaults, k)}

    def apply(self, x0: torch.Tensor) -> torch.Tensor:
        if self.thresholding:
            return dynamic_threshold(x0, float(self.dynamic_thresholding_ratio), float(self.sample_max_value))
        if self.clip_sample:
            return x0.clamp(-float(self.clip_sample_range), float(self.clip_sample_range))
        return x0


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per image over all its elements."""
    shape, dtype = x0.shape, x0.dtype
    flat = x0.reshape(shape[0], -1).float()          # (B, C, H, W) -> (B, C*H*W); quantile needs float
    # s = the ratio-quantile of |x0_pred|, at least 1 (then this is plain clipping) and at most max_value
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    # x0 <- clamp(x0, -s, s) / s
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(shape).to(dtype)


class BoundedDenoiser(Denoiser):
    """Any denoiser with x0_pred bounded by X0Bounds; eps re-derived or kept (see X0Bounds)."""

    def __init__(self, inner: Denoiser, bounds: X0Bounds):
        self.inner, self.bounds = inner, bounds
        self.model, self.prediction_type = inner, getattr(inner, "prediction_type", "epsilon")
        self.clip_sample, self.clip_sample_range = False, 1.0

    def __call__(self, x_t: torch.Tensor, t, abar, **cond) -> Prediction:
        pred = self.inner(x_t, t, abar, **cond)
        x0 = self.bounds.apply(pred.x0)
        if not self.bounds.use_clipped_model_output:
            return Prediction(x0, pred.eps)
        # eps = (x_t - sqrt(abar) x0_pred) / sqrt(1 - abar): the noise that the bounded x0_pred implies
        return Prediction(x0, eps_from_x0(x_t, x0, as_batch(abar, x_t)))
