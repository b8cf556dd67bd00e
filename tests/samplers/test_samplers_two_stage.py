"""kdpm2 (DPM-2) and dpmpp_2s / dpmpp_3s (singlestep DPM-Solver++): diffusers' scheduler loops step by step,
and known answers: DPM-2 is second order, a singlestep stage is exact when x0_pred is linear in lambda.

The registry-wide checks (contract, callback, Gaussian-mixture sliced Wasserstein, logsnr) in
test_samplers.py cover these samplers too.
"""
import math

import pytest
import torch

import diffusekit as dk
from diffusekit.samplers.dpm_solver import singlestep_orders
from diffusekit.toy import ExactDenoiserModel

SPACINGS = ["leading", "trailing", "linspace"]
SCHEDULE = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _noise(seed=1, n=64, d=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _xs(sampler, model, x_T, n, **kwargs):
    """x after every step (the VP convention of StepInfo)."""
    xs = []
    sampler.sample(model, x_T, num_steps=n, callback=lambda info: xs.append(info.x), **kwargs)
    return xs


def _theirs(scheduler, model, x_T):
    """diffusers' pipeline loop (set_timesteps already called): x after every scheduler.step, in float32."""
    x, xs = (x_T * scheduler.init_noise_sigma).float(), []
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t).double(), t.reshape(1).expand(len(x)).double()).float()
        x = scheduler.step(out, t, x).prev_sample
        xs.append(x)
    return xs


# --- kdpm2 ----------------------------------------------------------------------------------------

def _kdpm2(diffusers, sched, spacing, prediction_type="epsilon", karras=False):
    scheduler = diffusers.KDPM2DiscreteScheduler(**SCHEDULE, timestep_spacing=spacing, prediction_type=prediction_type,
                                                 use_karras_sigmas=karras)
    # diffusers starts from x_T * sigma_max with linspace / trailing spacing, from the exact sqrt(sigma^2 + 1) else
    sampler = dk.get_sampler("kdpm2", sched, prediction_type=prediction_type, timestep_spacing=spacing,
                             init_noise_sigma="exact" if spacing == "leading" else "sigma_max",
                             use_karras_sigmas=karras)
    return scheduler, sampler


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_kdpm2_calls_the_model_where_diffusers_does(diffusers, sched, spacing, n, karras):
    """t_0, then each step's log-sigma midpoint and the next t: 2n - 1 calls (Karras: t rounded, midpoints not)."""
    scheduler, sampler = _kdpm2(diffusers, sched, spacing, karras=karras)
    scheduler.set_timesteps(n)
    assert sampler.nfe(n) == 2 * n - 1 == len(scheduler.timesteps)
    # their fractional midpoints come from float32 sigmas: 1e-4 relative (seen: 4e-5 at t ~ 50)
    torch.testing.assert_close(sampler.timesteps(n), scheduler.timesteps.double(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_kdpm2_matches_diffusers_step_by_step(diffusers, sched, mixture, spacing, prediction_type, karras):
    """Every step to 1e-5 + 1e-5 relative (x in sigma space reaches ~100, where float32 resolves ~1e-5; Karras:
    1e-4 + 1e-4 relative, its sigma table is float32). diffusers steps twice per step of ours (midpoint, then on)."""
    scheduler, sampler = _kdpm2(diffusers, sched, spacing, prediction_type, karras)
    scheduler.set_timesteps(10)
    model = ExactDenoiserModel(mixture, sched, prediction_type)
    x_T = _noise()
    ours, theirs = _xs(sampler, model, x_T, 10), _theirs(scheduler, model, x_T)
    _, abars = sampler.plan(10)
    assert len(theirs) == 2 * len(ours) - 1
    for i, x in enumerate(ours):
        x_sigma = x / math.sqrt(float(abars[i + 1]))       # back to diffusers' sigma-space sample
        torch.testing.assert_close(x_sigma.float(), theirs[2 * i + 1 if i < 9 else -1],
                                   rtol=1e-4 if karras else 1e-5,
                                   atol=1e-4 if karras else 1e-5, msg=lambda m: f"step {i}: {m}")


def _gaussian_eps(sched, s_data):
    """The exact eps of data N(0, s_data^2 I), with sigma(t) interpolated in log sigma: the inverse of
    schedule.sigma_to_t, so the model sees exactly the noise level of every call, midpoints included."""
    log_sigmas = sched.sigmas.log()

    def model(x, t):
        t = t.double()
        lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
        sigma = torch.exp(log_sigmas[lo] + (t - lo) * (log_sigmas[lo + 1] - log_sigmas[lo])).reshape(-1, 1)
        x_sigma = x * (1 + sigma**2).sqrt()
        # eps = (x - D(x)) / sigma,  D(x) = x s^2 / (sigma^2 + s^2)
        return x_sigma * sigma / (sigma**2 + s_data**2)
    return model


def test_kdpm2_is_second_order(sched):
    """Gaussian data, whose probability-flow ODE has the closed form x(sigma) = x(sigma_0) sqrt((sigma^2 + s^2) /
    (sigma_0^2 + s^2)): halving the step quarters DPM-2's error (Euler's only halves)."""
    s_data, x_T = 0.5, _noise(n=16)
    model = _gaussian_eps(sched, s_data)
    errors = {"kdpm2": [], "euler": []}
    for n in (9, 17, 33):
        ts = torch.linspace(900, 100, n)              # whole timesteps: 100, 50 and 25 apart
        sigma_0, sigma_end = float(sched.sigmas[900]), float(sched.sigmas[100])
        x_sigma = x_T * math.sqrt(1 + sigma_0**2) * math.sqrt((sigma_end**2 + s_data**2) / (sigma_0**2 + s_data**2))
        expected = x_sigma / math.sqrt(1 + sigma_end**2)
        for name in errors:                           # stop before the final step to sigma = 0
            out = dk.get_sampler(name, sched).sample(model, x_T, timesteps=ts, stop_step=n - 1)
            errors[name].append(float((out - expected).abs().max()))
    for name, (e9, e17, e33) in errors.items():
        ratios = (e9 / e17, e17 / e33)
        assert all(3.5 < r < 4.5 for r in ratios) if name == "kdpm2" else all(1.7 < r < 2.3 for r in ratios), \
            f"{name}: errors {e9:.2e} {e17:.2e} {e33:.2e}"


# --- dpmpp_2s, dpmpp_3s ---------------------------------------------------------------------------

@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_singlestep_orders_are_diffusers_order_list(diffusers, solver_order):
    """diffusers forces lower_order_final on when the final sigma is 0 (always, for us), and ends first order."""
    scheduler = diffusers.DPMSolverSinglestepScheduler(solver_order=solver_order)
    for n in range(1, 21):
        scheduler.set_timesteps(n)
        assert singlestep_orders(n, solver_order) == scheduler.order_list, n


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("name,order", [("dpmpp_2s", 2), ("dpmpp_3s", 3)])
@pytest.mark.parametrize("n", [7, 10])
def test_dpmpp_singlestep_matches_diffusers_step_by_step(diffusers, sched, mixture, name, order, prediction_type,
                                                         solver_type, n):
    """DPMSolverSinglestepScheduler(solver_order=2 or 3): the same calls, every step to 1e-5."""
    scheduler = diffusers.DPMSolverSinglestepScheduler(**SCHEDULE, solver_order=order, solver_type=solver_type,
                                                       prediction_type=prediction_type)
    scheduler.set_timesteps(n)
    sampler = dk.get_sampler(name, sched, prediction_type=prediction_type, timestep_spacing="linspace",
                             solver_type=solver_type)
    torch.testing.assert_close(sampler.timesteps(n), scheduler.timesteps.double(), rtol=0, atol=0)
    model = ExactDenoiserModel(mixture, sched, prediction_type)
    x_T = _noise()
    for i, (a, b) in enumerate(zip(_xs(sampler, model, x_T, n), _theirs(scheduler, model, x_T))):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=1e-5, msg=lambda m: f"step {i}: {m}")


def _lambda_of(sched, t):
    abar = sched.alpha_bar_at(t.double())
    return 0.5 * torch.log(abar / (1 - abar))


@pytest.mark.parametrize("name,solver_type,exact", [("dpmpp_2s", "heun", True), ("dpmpp_3s", "heun", True),
                                                    ("dpmpp_3s", "midpoint", True), ("dpmpp_2s", "midpoint", False)])
def test_a_singlestep_stage_is_exact_when_x0_pred_is_linear_in_lambda(sched, name, solver_type, exact):
    """x0_pred = a + b lambda(t) makes the data-prediction ODE d(x / sigma)/d lambda = e^lambda x0_pred integrable:
    x_t / sigma_t = x_s / sigma_s + [e^lambda (a + b (lambda - 1))] from lambda_s to lambda_t. Every completed
    stage lands on it (its first-order intermediate points do not); 2S's midpoint D1 weight, (1 - e^-h) / 2 for
    phi_2 h, is second order only, so it misses by a visible amount."""
    a, b = torch.tensor([[0.3, -0.7]], dtype=torch.float64), 0.05
    model = lambda x, t: (a + b * _lambda_of(sched, t).reshape(-1, 1)).expand_as(x)  # noqa: E731
    sampler = dk.get_sampler(name, sched, prediction_type="sample", timestep_spacing="linspace",
                             solver_type=solver_type)
    n, x_T = 10, _noise(n=4)
    ts, abars = sampler.plan(n)
    orders = singlestep_orders(n, int(name[6]))
    xs = _xs(sampler, model, x_T, n)
    alpha, sigma, lam = abars.sqrt(), (1 - abars).sqrt(), 0.5 * torch.log(abars / (1 - abars))
    primitive = lambda k: torch.exp(lam[k]) * (a + b * (lam[k] - 1))  # noqa: E731
    x_start, worst = x_T, 0.0
    for i, order in enumerate(orders[:-1]):
        j = i - order + 1                         # the stage's first step
        x_j = x_T if j == 0 else xs[j - 1]
        expected = sigma[i + 1] * (x_j / sigma[j] + primitive(i + 1) - primitive(j))
        if order == int(name[6]):                 # a completed stage
            worst = max(worst, float(((xs[i] - expected).abs() / alpha[i + 1]).max()))
    assert (worst < 1e-9) if exact else (worst > 1e-4), f"{name} {solver_type}: {worst:.2e}"
