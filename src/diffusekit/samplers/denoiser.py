"""The denoiser wrapper every sampler calls: a network of any prediction type -> Prediction(x0, eps)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..config import check_choice
from ..schedule import PREDICTION_TYPES, as_batch, eps_from_x0, to_x0_eps


class Prediction(NamedTuple):
    """One denoiser evaluation: the predicted clean sample and the predicted noise."""
    x0: torch.Tensor
    eps: torch.Tensor


class Denoiser:
    """Wraps a network trained on any prediction type; returns Prediction(x0, eps).

    x_t is in the variance-preserving convention x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, abar is
    a float or a per-sample tensor, and t is in training-timestep units (fractional allowed).
    This is the one place where "epsilon", "sample" and "v_prediction" are told apart.
    Guidance wrappers (diffusekit.guidance) subclass Denoiser: anything that is an instance of it is
    called as denoiser(x_t, t, abar, **cond) -> Prediction; anything else is a raw network.
    """

    def __init__(self, model: Callable, prediction_type: str = "epsilon", clip_sample: bool = False,
                 clip_sample_range: float = 1.0):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.model, self.prediction_type = model, prediction_type
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range

    def __call__(self, x_t: torch.Tensor, t, abar, **cond) -> Prediction:
        t_batch = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t_batch.ndim == 0:
            t_batch = t_batch.expand(x_t.shape[0])
        out = self.model(x_t, t_batch, **cond).to(x_t.dtype)
        abar_b = as_batch(abar, x_t)
        x0, eps = to_x0_eps(self.prediction_type, out, x_t, abar_b)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            eps = eps_from_x0(x_t, x0, abar_b)
        return Prediction(x0, eps)
