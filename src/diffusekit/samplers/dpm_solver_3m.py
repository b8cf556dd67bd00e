"""DPM-Solver++(3M) (Lu et al. 2022): third-order multistep in data (x0) prediction, as an ODE and an SDE.

The second-order DPM-Solver++(2M) is in dpm_solver.py.
"""
from __future__ import annotations

import math

from ..config import check_choice
from .base import randn_like, register, run_callback
from .dpm_solver import SOLVER_TYPES  # diffusers' names for the two second-order (warm-up) updates


def _order(i: int, n: int, lower_order_final: bool) -> int:
    """Order of step i of n: 1, 2, 3 while the memory fills; with lower_order_final and fewer than
    15 steps, at most 2 and 1 at the last two steps (diffusers' rule, for stability with few steps)."""
    order = min(3, i + 1)
    if lower_order_final and n < 15:
        order = min(order, n - i)
    return order


def _dpmpp_3m(denoiser, x, ts, abars, eta, generator, callback, cond, solver_type, lower_order_final):
    """The shared loop: eta = 0 is the probability-flow ODE solver, eta = 1 the reverse-SDE solver."""
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    cond = cond or {}
    n = len(abars) - 1
    x0s, lambdas = [], []  # the last three x0 predictions and their lambda = log(alpha / sigma)
    for i in range(n):
        abar, abar_next = float(abars[i]), float(abars[i + 1])
        pred = denoiser(x, ts[i], abar, **cond)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0s, lambdas = (x0s + [pred.x0])[-3:], (lambdas + [math.log(alpha / sigma)])[-3:]
        if abar_next >= 1.0:
            x = pred.x0  # the step to sigma = 0 is first order and lands exactly on x0_pred
        else:
            alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(1 - abar_next)
            h = math.log(alpha_next / sigma_next) - lambdas[-1]
            h_eta = (1 + eta) * h
            order = _order(i, n, lower_order_final)
            # 1. x_next = (sigma_next / sigma) e^{-eta h} x + alpha_next (1 - e^{-h_eta}) D0,  h_eta = (1 + eta) h
            x = (sigma_next / sigma) * math.exp(-eta * h) * x - alpha_next * math.expm1(-h_eta) * x0s[-1]
            # 2. corrections from divided differences of the x0 history, in units of h
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if order >= 2:
                r0 = (lambdas[-1] - lambdas[-2]) / h
                d1_0 = (x0s[-1] - x0s[-2]) / r0
            if order == 2:
                # midpoint: + alpha_next (1 - e^{-h_eta}) D1 / 2;  heun: + alpha_next phi_2 D1
                coef = -0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else phi_2
                x = x + alpha_next * coef * d1_0
            elif order == 3:
                r1 = (lambdas[-2] - lambdas[-3]) / h
                d1_1 = (x0s[-2] - x0s[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                # the established weight of D2 (DPM-Solver's reference code, k-diffusion, diffusers' ODE);
                # D2 ~ h^2 x0''/2, and integrating that term exactly would take twice this weight
                phi_3 = phi_2 / h_eta - 0.5
                x = x + alpha_next * (phi_2 * d1 - phi_3 * d2)
            if eta > 0:
                # 3. fresh noise: + sigma_next sqrt(1 - e^{-2 eta h}) z
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * randn_like(x, generator)
        x = run_callback(callback, i, ts[i], abar_next, x, pred.x0)
    return x


@register("dpmpp_3m", style="solver", solver_type="midpoint", lower_order_final=True)
def sample_dpmpp_3m(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None,
                    solver_type="midpoint", lower_order_final=True):
    """DPM-Solver++(3M): DPM-Solver's third-order multistep update in log-SNR time, written in the
    data prediction of DPM-Solver++ (Lu et al. 2022); diffusers' DPMSolverMultistepScheduler(solver_order=3)."""
    return _dpmpp_3m(denoiser, x, ts, abars, 0.0, generator, callback, cond, solver_type, lower_order_final)


@register("dpmpp_3m_sde", style="solver", stochastic=True, eta=1.0, solver_type="midpoint",
          lower_order_final=True)
def sample_dpmpp_3m_sde(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, eta=1.0,
                        solver_type="midpoint", lower_order_final=True):
    """DPM-Solver++(3M) SDE: the 3M update with exponents (1 + eta) h plus fresh noise (k-diffusion's
    sample_dpmpp_3m_sde); eta = 1 solves the reverse SDE (SDE-DPM-Solver++), eta = 0 is dpmpp_3m.

    solver_type="heun", lower_order_final=False is k-diffusion's sampler exactly, up to its noise
    (a Brownian tree there, independent normals here: the same distribution on a fixed grid).
    """
    return _dpmpp_3m(denoiser, x, ts, abars, float(eta), generator, callback, cond, solver_type,
                     lower_order_final)
