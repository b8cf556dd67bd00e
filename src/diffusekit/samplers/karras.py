"""ODE/SDE samplers in sigma space, x = x0 + sigma * eps (Karras et al. 2022, "EDM"): Euler, Euler ancestral,
Heun, LMS, DPM-2.

init_noise_sigma: "exact" starts from x_T * sqrt(sigma_max^2 + 1), the exact image of unit VP noise;
"sigma_max" from x_T * sigma_max, as diffusers' Euler/Heun classes do with "linspace" or "trailing"
spacing (a folder with such a scheduler gets it by default, so that it samples as diffusers does).
"""
from __future__ import annotations

import math

from numpy.polynomial import polynomial as P

from .base import lagrange_basis, randn_like, register, run_callback, sigma_of


INIT_NOISE_SIGMAS = ("exact", "sigma_max")


def _to_sigma_space(x_vp, abar, init_noise_sigma="exact"):
    # x / sqrt(abar) = x0 + sigma eps, so the VP input is scaled by sqrt(1 + sigma^2); "sigma_max" scales
    # unit noise by sigma alone, as diffusers' Euler/Heun classes do for "linspace" and "trailing" spacing
    if init_noise_sigma == "sigma_max":
        return x_vp * sigma_of(abar)
    if init_noise_sigma != "exact":
        raise ValueError(f"init_noise_sigma={init_noise_sigma!r}; choose one of {INIT_NOISE_SIGMAS}.")
    return x_vp / math.sqrt(abar)


def _to_vp(x, abars):
    # back to the VP convention at the last noise level (a no-op after a full run, where abar = 1)
    return x * math.sqrt(float(abars[-1]))


def _step_callback(callback, i, t, abar_next, x, x0_pred):
    """Run the callback in the VP convention and bring any replacement back to sigma space."""
    if callback is None:
        return x
    scale = math.sqrt(abar_next)
    x_vp = x * scale
    out = run_callback(callback, i, t, abar_next, x_vp, x0_pred)
    return x if out is x_vp else out / scale


@register("euler", style="karras", init_noise_sigma="exact")
def sample_euler(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, init_noise_sigma="exact"):
    """Euler's method on the probability-flow ODE dx/dsigma = eps (Karras et al. 2022, Alg. 1 without churn)."""
    cond = cond or {}
    sigmas = [sigma_of(float(a)) for a in abars]
    x = _to_sigma_space(x, float(abars[0]), init_noise_sigma)
    for i in range(len(ts)):
        # the network sees the VP input x / sqrt(1 + sigma^2)
        pred = denoiser(x / math.sqrt(1 + sigmas[i] ** 2), ts[i], float(abars[i]), **cond)
        # x_next = x + (sigma_next - sigma) * d,  d = (x - x0_pred) / sigma = eps
        x = x + (sigmas[i + 1] - sigmas[i]) * pred.eps
        x = _step_callback(callback, i, ts[i], float(abars[i + 1]), x, pred.x0)
    return _to_vp(x, abars)


@register("euler_ancestral", style="karras", stochastic=True, init_noise_sigma="exact")
def sample_euler_ancestral(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None,
                           init_noise_sigma="exact"):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion)."""
    cond = cond or {}
    sigmas = [sigma_of(float(a)) for a in abars]
    x = _to_sigma_space(x, float(abars[0]), init_noise_sigma)
    for i in range(len(ts)):
        s, s_next = sigmas[i], sigmas[i + 1]
        pred = denoiser(x / math.sqrt(1 + s**2), ts[i], float(abars[i]), **cond)
        # sigma_up^2 = s_next^2 (s^2 - s_next^2) / s^2,  sigma_down^2 = s_next^2 - sigma_up^2
        sigma_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        sigma_down = math.sqrt(s_next**2 - sigma_up**2)
        x = x + (sigma_down - s) * pred.eps
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        x = _step_callback(callback, i, ts[i], float(abars[i + 1]), x, pred.x0)
    return _to_vp(x, abars)


@register("heun", style="karras", evals_per_step=2, init_noise_sigma="exact")
def sample_heun(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, init_noise_sigma="exact"):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the step to sigma = 0 is an Euler step."""
    cond = cond or {}
    sigmas = [sigma_of(float(a)) for a in abars]
    x = _to_sigma_space(x, float(abars[0]), init_noise_sigma)
    for i in range(len(abars) - 1):   # ts holds one more time when the run stops early
        s, s_next = sigmas[i], sigmas[i + 1]
        pred = denoiser(x / math.sqrt(1 + s**2), ts[i], float(abars[i]), **cond)
        d = pred.eps
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            # 2nd evaluation at the Euler point, then the average of the two slopes (trapezoidal rule)
            pred = denoiser(x_euler / math.sqrt(1 + s_next**2), ts[i + 1], float(abars[i + 1]), **cond)
            x = x + (s_next - s) * 0.5 * (d + pred.eps)
        x = _step_callback(callback, i, ts[i], float(abars[i + 1]), x, pred.x0)
    return _to_vp(x, abars)


@register("lms", style="karras", init_noise_sigma="exact", order=4)
def sample_lms(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, init_noise_sigma="exact",
               order=4):
    """Linear multistep on dx/dsigma = eps (k-diffusion's sample_lms, diffusers' LMSDiscreteScheduler): eps
    interpolated in sigma through the last `order` predictions and integrated exactly over the step."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise ValueError(f"order={order!r}; give a positive integer (diffusers' and k-diffusion's default is 4).")
    cond = cond or {}
    sigmas = [sigma_of(float(a)) for a in abars]
    x = _to_sigma_space(x, float(abars[0]), init_noise_sigma)
    eps_history = []  # eps at each step's start, newest last: the multistep memory
    for i in range(len(ts)):
        pred = denoiser(x / math.sqrt(1 + sigmas[i] ** 2), ts[i], float(abars[i]), **cond)
        eps_history = (eps_history + [pred.eps])[-order:]
        nodes = sigmas[i::-1][:len(eps_history)]   # sigma_i, sigma_{i-1}, ...: newest first
        # x_next = x + sum_j w_j eps_{i-j},  w_j = integral from sigma_i to sigma_next of L_j(s) ds
        weights = []
        for j in range(len(nodes)):
            antiderivative = P.polyint(lagrange_basis(nodes, j))
            weights.append(float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)))
        x = x + sum(w * e for w, e in zip(weights, reversed(eps_history)))
        x = _step_callback(callback, i, ts[i], float(abars[i + 1]), x, pred.x0)
    return _to_vp(x, abars)


@register("kdpm2", style="karras", evals_per_step=2, log_midpoints=True, karras_rounded=True, init_noise_sigma="exact")
def sample_kdpm2(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, init_noise_sigma="exact",
                 midpoints=()):
    """DPM-2: DPM-Solver-2 (Lu et al. 2022, Alg. 1, r1 = 1/2) on dx/dsigma = eps, where lambda = -log sigma: the
    slope at the log-sigma midpoint carries the whole step (diffusers' KDPM2DiscreteScheduler, k-diffusion's
    sample_dpm_2); the step to sigma = 0 is an Euler step.

    midpoints[i] = (t_mid, abar_mid) of step i (Sampler.plan_log_midpoints), None for a step to sigma = 0.
    """
    cond = cond or {}
    sigmas = [sigma_of(float(a)) for a in abars]
    x = _to_sigma_space(x, float(abars[0]), init_noise_sigma)
    for i in range(len(abars) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        pred = denoiser(x / math.sqrt(1 + s**2), ts[i], float(abars[i]), **cond)
        mid = midpoints[i] if i < len(midpoints) else None
        if mid is None:
            if s_next > 0:
                raise ValueError("kdpm2 needs the midpoint of every step to sigma > 0; run it through a Sampler "
                                 "(dk.get_sampler('kdpm2', ...)), which plans them.")
            x = x + (s_next - s) * pred.eps
        else:
            t_mid, abar_mid = mid
            s_mid = sigma_of(abar_mid)   # = sqrt(s * s_next): half-way in log sigma
            # 1. Euler to the midpoint: x_mid = x + (s_mid - s) eps(x, s)
            x_mid = x + (s_mid - s) * pred.eps
            # 2. the full step with the midpoint's slope: x_next = x + (s_next - s) eps(x_mid, s_mid)
            pred = denoiser(x_mid / math.sqrt(1 + s_mid**2), t_mid, abar_mid, **cond)
            x = x + (s_next - s) * pred.eps
        x = _step_callback(callback, i, ts[i], float(abars[i + 1]), x, pred.x0)
    return _to_vp(x, abars)
