"""Known distributions with exact denoisers, for testing and benchmarking samplers.

For Gaussian-mixture data the posterior mean E[x0 | x_t] has a closed form, so a sampler run with
this ideal denoiser must reproduce the data distribution; any error is the sampler's own.
"""
from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule, PREDICTION_TYPES, velocity


class GaussianMixture:
    """An isotropic Gaussian mixture in d dimensions: weights (K,), means (K, d), stds (K,)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def random(cls, dim: int, num_components: int, generator: torch.Generator, spread: float = 1.0,
               std: float = 0.3) -> "GaussianMixture":
        """A mixture with means drawn N(0, spread^2 / dim) per coordinate (so |mu| ~ spread)."""
        means = torch.randn(num_components, dim, generator=generator, dtype=torch.float64) * spread / math.sqrt(dim)
        weights = torch.rand(num_components, generator=generator, dtype=torch.float64) + 0.5
        return cls(means, std, weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def posterior_mean(self, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; abar is (B, 1)."""
        x_t, abar = x_t.double(), abar.double()
        sa = abar.sqrt()
        # component k: x_t ~ N(sqrt(abar) mu_k, v_k I), v_k = abar s_k^2 + 1 - abar
        v = abar * self.stds[None] ** 2 + (1 - abar)                         # (B, K)
        diff = x_t[:, None, :] - sa[:, :, None] * self.means[None]            # (B, K, d)
        log_r = torch.log(self.weights)[None] - 0.5 * (diff**2).sum(-1) / v - 0.5 * self.dim * torch.log(v)
        r = torch.softmax(log_r, dim=1)                                       # responsibilities
        # E[x0 | x_t, k] = mu_k + sqrt(abar) s_k^2 / v_k (x_t - sqrt(abar) mu_k)
        cond_mean = self.means[None] + (sa * self.stds[None] ** 2 / v)[:, :, None] * diff
        return (r[:, :, None] * cond_mean).sum(1)


class ExactDenoiserModel(torch.nn.Module):
    """A "network" that returns the ideal prediction of the given type for a GaussianMixture.

    Takes x of shape (B, d) (or (B, d, 1, 1)) and t (B,) in training-timestep units.
    Counts its evaluations in .nfe.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}.")
        self.mixture, self.schedule, self.prediction_type = mixture, schedule, prediction_type
        self.nfe = 0

    def forward(self, x, t, **cond):
        self.nfe += 1
        shape = x.shape
        x2 = x.reshape(shape[0], -1).double()
        abar = self.schedule.alpha_bar_at(t.double().cpu()).reshape(-1, 1).to(x2.device)
        abar = abar.expand(shape[0], 1)
        x0 = self.mixture.posterior_mean(x2, abar)
        eps = (x2 - abar.sqrt() * x0) / (1 - abar).sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": velocity(x0, eps, abar)}[self.prediction_type]
        return out.to(x.dtype).reshape(shape)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point sets (N, d)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"point sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(0)
    pb, _ = (b @ dirs).sort(0)
    return float((pa - pb).abs().mean())
