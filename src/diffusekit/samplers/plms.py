"""PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"): linear multistep on eps."""
from __future__ import annotations

import math

from .base import register, run_callback


def _transfer(x, eps, abar, abar_next):
    """PNDM's transfer part phi(x_t, eps, t, t - delta) (PNDM eq. 9); algebraically the eta = 0 DDIM step."""
    # x_next = sqrt(abar_next / abar) x
    #          - (abar_next - abar) / (sqrt(abar) (sqrt((1 - abar_next) abar) + sqrt((1 - abar) abar_next))) eps
    denom = math.sqrt(abar) * (math.sqrt((1 - abar_next) * abar) + math.sqrt((1 - abar) * abar_next))
    return math.sqrt(abar_next / abar) * x - ((abar_next - abar) / denom) * eps


# Adams-Bashforth weights of the last 1-4 eps, newest first (PNDM's PLMS and its warm-up)
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@register("plms", style="ddim", karras=False, first_step_evals=2, set_alpha_to_one=True)
def sample_plms(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None):
    """PLMS: 4th-order Adams-Bashforth on eps with PNDM's transfer (PNDM eq. 9), started by one
    pseudo improved Euler step instead of the paper's Runge-Kutta steps (diffusers' skip_prk_steps).

    The first step costs two model calls, so n steps cost n + 1. The eps of the extra call is used
    for that step only; the multistep memory holds one eps per step, each taken at the step's start.
    A run that stops early gets the time of the level it stops at (Sampler.sample); without it, a
    one-step run takes a first-order step.
    """
    cond = cond or {}
    eps_history = []  # eps at the start of each step, newest last: the multistep memory
    for i in range(len(abars) - 1):
        abar, abar_next = float(abars[i]), float(abars[i + 1])
        pred = denoiser(x, ts[i], abar, **cond)
        eps_history = (eps_history + [pred.eps])[-4:]
        if i == 0 and abar_next < 1.0 and len(ts) > 1:
            # pseudo improved Euler: eps' = (eps(x, t) + eps(phi(x, eps, t, t_next), t_next)) / 2
            x_euler = _transfer(x, pred.eps, abar, abar_next)
            eps = 0.5 * (pred.eps + denoiser(x_euler, ts[1], abar_next, **cond).eps)
        else:
            # eps' = sum_j w_j eps_{i-j}  (linear multistep of order len(eps_history))
            weights = ADAMS_BASHFORTH[len(eps_history)]
            eps = sum(w * e for w, e in zip(weights, reversed(eps_history)))
        x = _transfer(x, eps, abar, abar_next)
        x = run_callback(callback, i, ts[i], abar_next, x, pred.x0)
    return x


# PNDM's Runge-Kutta warm-up: steps before the linear multistep formula has the four eps it uses
PRK_STEPS = 3


@register("pndm", style="ddim", karras=False, half_steps=PRK_STEPS, set_alpha_to_one=True)
def sample_pndm(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, midpoints=()):
    """PNDM (Liu et al. 2022, Algorithm 2): three pseudo Runge-Kutta steps (PRK, eq. 13), then the
    4th-order pseudo linear multistep (PLMS, eq. 12); diffusers' PNDMScheduler with skip_prk_steps=False.

    midpoints[i] = (t_mid, abar_mid, abar_half) is step i's half-way level (Sampler.plan_midpoints;
    abar_half, where the first stage lands, is abar_mid but for diffusers' odd T // n), None where
    step i has no next time to go half-way to. Each PRK step costs four model calls, so n >= 4
    steps cost n + 9. The multistep memory holds the eps at each step's start.
    """
    cond = cond or {}
    eps_history = []  # eps at the start of each step, newest last: the multistep memory
    for i in range(len(abars) - 1):
        abar, abar_next = float(abars[i]), float(abars[i + 1])
        pred = denoiser(x, ts[i], abar, **cond)
        eps_history = (eps_history + [pred.eps])[-4:]
        mid = midpoints[i] if i < min(PRK_STEPS, len(midpoints)) else None
        if mid is not None:
            # PRK (PNDM eq. 13), with delta the step and phi the transfer of eq. 9:
            #   e1 = eps(x, t);                    x1 = phi(x, e1, t, t - delta/2)
            #   e2 = eps(x1, t - delta/2);         x2 = phi(x, e2, t, t - delta/2)
            #   e3 = eps(x2, t - delta/2);         x3 = phi(x, e3, t, t - delta)
            #   e4 = eps(x3, t - delta);           eps' = (e1 + 2 e2 + 2 e3 + e4) / 6
            t_mid, abar_mid, abar_half = mid
            e2 = denoiser(_transfer(x, pred.eps, abar, abar_half), t_mid, abar_mid, **cond).eps
            e3 = denoiser(_transfer(x, e2, abar, abar_mid), t_mid, abar_mid, **cond).eps
            e4 = denoiser(_transfer(x, e3, abar, abar_next), ts[i + 1], abar_next, **cond).eps
            eps = (pred.eps + 2 * e2 + 2 * e3 + e4) / 6
        else:
            # PLMS (PNDM eq. 12): eps' = sum_j w_j eps_{i-j}, order len(eps_history)
            weights = ADAMS_BASHFORTH[len(eps_history)]
            eps = sum(w * e for w, e in zip(weights, reversed(eps_history)))
        # x_next = phi(x, eps', t, t - delta)   (PNDM eq. 9)
        x = _transfer(x, eps, abar, abar_next)
        x = run_callback(callback, i, ts[i], abar_next, x, pred.x0)
    return x
