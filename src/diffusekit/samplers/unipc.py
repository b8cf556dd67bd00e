"""UniPC (Zhao et al. 2023): unified predictor-corrector, order 2, B(h) = e^h - 1 ("bh2"), data prediction."""
from __future__ import annotations

import math

import torch

from .base import register, run_callback


def _phi_coefficients(hh: float):
    """h*phi_1(hh) = e^hh - 1, B(h) = e^hh - 1, and the right-hand side b of UniPC's linear system."""
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    b1 = h_phi_k / b_h
    h_phi_k = h_phi_k / hh - 1 / 2
    b2 = h_phi_k * 2 / b_h
    return h_phi_1, b_h, (b1, b2)


@register("unipc", style="solver")
def sample_unipc(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None):
    """UniPC-2 (UniP predictor + UniC corrector reusing the next model call; Zhao et al. 2023, Alg. 1-2)."""
    cond = cond or {}
    alphas = [math.sqrt(float(a)) for a in abars]
    sigmas = [math.sqrt(max(1 - float(a), 0.0)) for a in abars]
    lambdas = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
    x0s: list[torch.Tensor] = []   # x0 predictions so far, the multistep memory
    x_last, order_last = None, 0
    x_predicted = x  # the last predictor output, before any callback change
    n = len(ts)
    for k in range(n):
        pred = denoiser(x, ts[k], float(abars[k]), **cond)
        if k > 0:
            # UniC: correct x_k with the fresh x0 prediction, at the order the predictor used
            h = lambdas[k] - lambdas[k - 1]
            h_phi_1, b_h, (b1, b2) = _phi_coefficients(-h)
            m0 = x0s[-1]
            x_given = x  # what the previous step returned (a callback may have changed it)
            x = sigmas[k] / sigmas[k - 1] * x_last - alphas[k] * h_phi_1 * m0
            if order_last == 1:
                x = x - alphas[k] * b_h * 0.5 * (pred.x0 - m0)
            else:
                r1 = (lambdas[k - 2] - lambdas[k - 1]) / h
                # rho solves [[1, 1], [r1, 1]] rho = [b1, b2]
                rho_d = (b1 - b2) / (1 - r1)
                rho_t = b1 - rho_d
                x = x - alphas[k] * b_h * (rho_d * (x0s[-2] - m0) / r1 + rho_t * (pred.x0 - m0))
            # keep any change the callback made to the predicted x (inpainting, editing)
            x = x + (x_given - x_predicted)
        x0s.append(pred.x0)
        order = min(2, n - k, k + 1)  # warm up with order 1, and end with order 1
        x_last, order_last = x, order
        if sigmas[k + 1] == 0:
            x = pred.x0  # the step to sigma = 0 lands on x0_pred
        else:
            # UniP: x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) x0 - alpha_next B(h) rho D1
            h = lambdas[k + 1] - lambdas[k]
            h_phi_1, b_h, _ = _phi_coefficients(-h)
            x = sigmas[k + 1] / sigmas[k] * x - alphas[k + 1] * h_phi_1 * pred.x0
            if order == 2:
                r1 = (lambdas[k - 1] - lambdas[k]) / h
                x = x - alphas[k + 1] * b_h * 0.5 * (x0s[-2] - pred.x0) / r1
        x_predicted = x
        x = run_callback(callback, k, ts[k], float(abars[k + 1]), x, pred.x0)
    return x
