"""DPM-Solver++ (Lu et al. 2022): exponential-integrator solvers in data (x0) prediction."""
from __future__ import annotations

import math

from .base import register, run_callback


@register("dpmpp_2m", style="solver")
def sample_dpmpp_2m(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None):
    """DPM-Solver++(2M): second-order multistep in log-SNR time (Lu et al. 2022, Algorithm 2)."""
    cond = cond or {}
    x0_prev, h_prev = None, None  # the solver's memory lives here, not on an object
    for i in range(len(ts)):
        abar, abar_next = float(abars[i]), float(abars[i + 1])
        pred = denoiser(x, ts[i], abar, **cond)
        if abar_next >= 1.0:
            # the step to sigma = 0 is first order and lands exactly on x0_pred
            x = pred.x0
        else:
            alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
            alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(1 - abar_next)
            # lambda = log(alpha / sigma), h = lambda_next - lambda
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
            if x0_prev is None:
                d = pred.x0
            else:
                # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,  r = h_prev / h   (DPM-Solver++ Alg. 2)
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * x0_prev
            # x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            h_prev = h
        x0_prev = pred.x0
        x = run_callback(callback, i, ts[i], abar_next, x, pred.x0)
    return x
