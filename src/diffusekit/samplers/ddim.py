"""DDIM (Song et al. 2021): the non-Markovian sampler and its deterministic inversion."""
from __future__ import annotations

import math

from .base import randn_like, register, run_callback


@register("ddim", style="ddim", karras=False, eta=0.0, exact_zero_snr=True, clip_keeps_eps=True,
          set_alpha_to_one=True)
def sample_ddim(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, eta=0.0):
    """DDIM sampling (DDIM eq. 12); eta = 0 is deterministic, eta = 1 has DDPM's posterior variance."""
    cond = cond or {}
    for i in range(len(ts)):
        abar, abar_prev = float(abars[i]), float(abars[i + 1])
        # 1. predict x0 and eps
        pred = denoiser(x, ts[i], abar, **cond)
        # 2. sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)   (DDIM eq. 16)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        # 3. x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z   (DDIM eq. 12)
        x = math.sqrt(abar_prev) * pred.x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * pred.eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        x = run_callback(callback, i, ts[i], abar_prev, x, pred.x0)
    return x


def ddim_invert(denoiser, x0, ts, abars, *, refine_steps: int = 0, callback=None, cond=None):
    """Deterministic DDIM encoder x0 -> x_T: the eta = 0 update run with the timesteps ascending.

    ts, abars are a sampling plan (Sampler.plan); inversion walks it backwards so that DDIM
    sampling with the same plan maps the result back to x0. Each step must find x_i with
    DDIM(x_i) = x_{i+1}; plain inversion uses eps(x_{i+1}, t_i) in place of eps(x_i, t_i), and
    refine_steps > 0 iterates that as a fixed point (as in "exact inversion" / fixed-point
    inversion papers), which drives the reconstruction error toward zero.
    """
    cond = cond or {}
    x = x0
    for i in reversed(range(len(ts))):
        abar, abar_next = float(abars[i]), float(abars[i + 1])  # abar_next is the cleaner level
        x_next, guess = x, x
        for _ in range(1 + refine_steps):
            eps = denoiser(guess, ts[i], abar, **cond).eps
            # invert x_next = sqrt(abar_next) (x_i - sqrt(1 - abar) eps) / sqrt(abar) + sqrt(1 - abar_next) eps
            guess = math.sqrt(abar / abar_next) * (x_next - math.sqrt(1 - abar_next) * eps) + math.sqrt(1 - abar) * eps
        # report x at the noisier level abars[i] reached by this inverse step
        x = run_callback(callback, len(ts) - 1 - i, ts[i], abar, guess, None)
    return x
