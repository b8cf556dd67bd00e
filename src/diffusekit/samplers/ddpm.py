"""Ancestral sampling (Ho et al. 2020, DDPM Algorithm 2), also with fewer steps than training."""
from __future__ import annotations

import math

from .base import randn_like, register, run_callback


@register("ddpm", style="ddim", stochastic=True, karras=False, exact_zero_snr=True, clip_keeps_eps=True,
          variance_type="fixed_small")
def sample_ddpm(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None,
                variance_type="fixed_small"):
    """DDPM ancestral sampling; with skipped steps, beta_t is 1 - abar_t / abar_prev."""
    cond = cond or {}
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type={variance_type!r}; choose 'fixed_small' (beta_tilde) or 'fixed_large' (beta_t).")
    n = len(ts)
    for i in range(n):
        abar, abar_prev = float(abars[i]), float(abars[i + 1])
        beta = 1 - abar / abar_prev
        pred = denoiser(x, ts[i], abar, **cond)
        # x_{t-1} = s1 (x_t - s2 eps) + s3 z, s1 = 1/sqrt(alpha_t), s2 = beta_t/sqrt(1 - abar_t)   (DDPM Alg. 2)
        # written as the posterior mean at x0_pred (DDPM eq. 7), which is the same unless x0 is clipped
        mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * pred.x0 + \
               (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
        if abar_prev < 1.0:  # no noise at the last step (the one to the clean sample)
            var = beta if variance_type == "fixed_large" else max((1 - abar_prev) / (1 - abar) * beta, 1e-20)
            x = mean + math.sqrt(var) * randn_like(x, generator)
        else:
            x = mean
        x = run_callback(callback, i, ts[i], abar_prev, x, pred.x0)
    return x
