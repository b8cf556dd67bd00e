"""DPM-Solver++ (Lu et al. 2022): exponential-integrator solvers in data (x0) prediction.

dpmpp_2m: the second-order multistep solver; dpmpp_2s / dpmpp_3s: the singlestep solvers (the third-order
multistep one is in dpm_solver_3m.py).
"""
from __future__ import annotations

import math

from ..config import check_choice
from .base import register, run_callback

SOLVER_TYPES = ("midpoint", "heun")  # diffusers' names for the two higher-order updates


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


def singlestep_orders(n: int, solver_order: int) -> list[int]:
    """The order of each of n model calls: stages of 1, 2, .., solver_order calls, the last stage cut short,
    the last call first order (diffusers' DPMSolverSinglestepScheduler order list, whose lower_order_final
    is always on when the final sigma is 0)."""
    orders = [i % solver_order + 1 for i in range(n)]
    orders[-1] = 1
    return orders


def _lambda(abar: float) -> float:
    # lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2
    return 0.5 * math.log(abar / (1 - abar))


def _singlestep_update(x_start, x0s, stage_abars, abar_next, solver_type):
    """One singlestep stage from x_start (at stage_abars[0]) to abar_next with the x0 predictions of its calls
    (DPM-Solver++, Lu et al. 2022, Alg. 1; DPM-Solver-3 written in data prediction); r_j = (lambda_j - lambda_0) / h."""
    alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(1 - abar_next)
    lambdas = [_lambda(a) for a in stage_abars]
    h = _lambda(abar_next) - lambdas[0]
    phi_1, phi_2 = -math.expm1(-h), math.expm1(-h) / h + 1   # 1 - e^{-h},  (e^{-h} - 1) / h + 1
    # 1. x_next = (sigma_next / sigma_0) x_start + alpha_next (1 - e^{-h}) D0,  D0 = x0 at the stage's start
    x = (sigma_next / math.sqrt(1 - stage_abars[0])) * x_start + alpha_next * phi_1 * x0s[0]
    if len(x0s) == 2:
        # 2. D1 = (x0_1 - x0_0) / r1;  midpoint: + alpha_next (1 - e^{-h}) D1 / 2,  heun: + alpha_next phi_2 D1
        d1 = (x0s[1] - x0s[0]) / ((lambdas[1] - lambdas[0]) / h)
        x = x + alpha_next * (0.5 * phi_1 if solver_type == "midpoint" else phi_2) * d1
    elif len(x0s) == 3:
        r1, r2 = (lambdas[1] - lambdas[0]) / h, (lambdas[2] - lambdas[0]) / h
        d1_1, d1_2 = (x0s[1] - x0s[0]) / r1, (x0s[2] - x0s[0]) / r2
        if solver_type == "midpoint":
            # 2. DPM-Solver-3's last stage: + alpha_next phi_2 D1,  D1 from the second intermediate point alone
            x = x + alpha_next * phi_2 * d1_2
        else:
            # 2. D1 and D2 from both intermediate points: + alpha_next (phi_2 D1 - phi_3 D2)
            d1 = (r2 * d1_1 - r1 * d1_2) / (r2 - r1)
            d2 = 2 * (d1_2 - d1_1) / (r2 - r1)
            phi_3 = (math.expm1(-h) + h) / h**2 - 0.5
            x = x + alpha_next * (phi_2 * d1 - phi_3 * d2)
    return x


def _dpmpp_singlestep(denoiser, x, ts, abars, callback, cond, solver_order, solver_type):
    """The shared loop: a stage starts with a first-order call, and its j-th call (order j) solves from the
    stage's start to the next level with the stage's j x0 predictions."""
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    cond = cond or {}
    for i, order in enumerate(singlestep_orders(len(abars) - 1, solver_order)):
        abar, abar_next = float(abars[i]), float(abars[i + 1])
        pred = denoiser(x, ts[i], abar, **cond)
        if order == 1:
            x_start, x0s, stage_abars = x, [], []   # a stage's memory: its start, the x0 and level of its calls
        x0s, stage_abars = x0s + [pred.x0], stage_abars + [abar]
        if abar_next >= 1.0:
            x = pred.x0   # the step to sigma = 0 is first order and lands exactly on x0_pred
        else:
            x = _singlestep_update(x_start, x0s, stage_abars, abar_next, solver_type)
        x = run_callback(callback, i, ts[i], abar_next, x, pred.x0)
    return x


@register("dpmpp_2s", style="solver", solver_type="midpoint")
def sample_dpmpp_2s(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, solver_type="midpoint"):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) on the plan's own grid: each pair of calls is one second-order
    step whose intermediate point is the grid point between (diffusers' DPMSolverSinglestepScheduler, order 2)."""
    return _dpmpp_singlestep(denoiser, x, ts, abars, callback, cond, 2, solver_type)


@register("dpmpp_3s", style="solver", solver_type="midpoint")
def sample_dpmpp_3s(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, solver_type="midpoint"):
    """DPM-Solver++(3S): third-order singlestep, each three calls one step with the two grid points between as its
    intermediate points (Lu et al. 2022; diffusers' DPMSolverSinglestepScheduler, order 3)."""
    return _dpmpp_singlestep(denoiser, x, ts, abars, callback, cond, 3, solver_type)
