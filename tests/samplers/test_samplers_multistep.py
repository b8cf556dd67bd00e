"""plms, dpmpp_3m, dpmpp_3m_sde and deis: diffusers' scheduler loops step by step, and known answers.

The registry-wide checks (contract, callback, Gaussian-mixture sliced Wasserstein, logsnr) in
test_samplers.py and test_samplers_extra.py cover these samplers too; this file adds the
comparisons with diffusers and the closed-form checks specific to each method.
"""
import math

import pytest
import torch

import diffusekit as dk
from diffusekit.toy import ExactDenoiserModel, GaussianMixture

SPACINGS = ["leading", "trailing", "linspace"]
SCHEDULE = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _noise(seed=1, n=64, d=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ours(sampler, model, x_T, n, generator=None, **kwargs):
    """x after every step and the x0 prediction of every step."""
    xs, x0s = [], []

    def record(info):
        xs.append(info.x)
        x0s.append(info.x0_pred)
    sampler.sample(model, x_T, num_steps=n, generator=generator, callback=record, **kwargs)
    return xs, x0s


def _theirs(scheduler, model, x_T, dtype=torch.float32, noises=None):
    """diffusers' pipeline loop (set_timesteps already called); x after every scheduler.step."""
    x, xs = x_T.to(dtype), []
    for k, t in enumerate(scheduler.timesteps):
        out = model(x.double(), t.reshape(1).expand(len(x)).double()).to(dtype)
        extra = {} if noises is None else {"variance_noise": noises[k]}
        x = scheduler.step(out, t, x, **extra).prev_sample
        xs.append(x)
    return xs


def _assert_trajectories_close(ours, theirs, atol):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=atol, msg=lambda m: f"step {i}: {m}")


# --- plms ---------------------------------------------------------------------------------------

def _pndm(diffusers, spacing, prediction_type="epsilon"):
    # set_alpha_to_one: the last step goes to the clean sample, as every sampler of ours
    return diffusers.PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=True,
                                   prediction_type=prediction_type, timestep_spacing=spacing)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_plms_calls_the_model_where_pndm_does(diffusers, sched, mixture, spacing, n):
    """The first step's extra call is counted: timesteps() is diffusers' list, repeated time included."""
    scheduler = _pndm(diffusers, spacing)
    scheduler.set_timesteps(n)
    sampler = dk.get_sampler("plms", sched, timestep_spacing=spacing)
    torch.testing.assert_close(sampler.timesteps(n), scheduler.timesteps.double(), rtol=0, atol=0)
    model = ExactDenoiserModel(mixture, sched)
    sampler.sample(model, _noise(n=4), num_steps=n)
    assert model.nfe == sampler.nfe(n) == len(scheduler.timesteps) == (n + 1 if n > 1 else 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_plms_matches_pndm_step_by_step(diffusers, sched, mixture, spacing, prediction_type):
    """In float64 with diffusers' abar table replaced by ours, every step agrees to 1e-10.

    diffusers' extra first call is its step 0 (an Euler point), so its steps 1.. are our steps.
    v_prediction is compared with diffusers run on the eps of the same denoiser: our PLMS works on
    eps whatever the network predicts, while diffusers' PNDM with v_prediction extrapolates the raw
    v outputs and converts the result at the current step, so its answer depends on the
    parametrization. ("linspace" is left out as for DDIM: diffusers steps to t - T // n.)
    """
    scheduler = _pndm(diffusers, spacing)
    scheduler.set_timesteps(10)
    scheduler.alphas_cumprod = sched.alphas_cumprod.clone()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    x_T = _noise()
    theirs = _theirs(scheduler, ExactDenoiserModel(mixture, sched, "epsilon"), x_T, torch.float64)[1:]
    sampler = dk.get_sampler("plms", sched, prediction_type=prediction_type, timestep_spacing=spacing)
    ours, _ = _ours(sampler, ExactDenoiserModel(mixture, sched, prediction_type), x_T, 10)
    _assert_trajectories_close(ours, theirs, atol=1e-10)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_plms_matches_pndm_as_shipped(diffusers, sched, mixture, spacing):
    """diffusers' own float32 tables: the same final sample to 1e-5."""
    scheduler = _pndm(diffusers, spacing)
    scheduler.set_timesteps(10)
    model = ExactDenoiserModel(mixture, sched)
    x_T = _noise()
    theirs = _theirs(scheduler, model, x_T)[-1]
    ours = dk.get_sampler("plms", sched, timestep_spacing=spacing).sample(model, x_T, num_steps=10)
    torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=1e-5)


# --- pndm: PNDM's Runge-Kutta warm-up (diffusers' skip_prk_steps=False, PNDMScheduler's default) ------

def _pndm_prk(diffusers, spacing):
    return diffusers.PNDMScheduler(**SCHEDULE, skip_prk_steps=False, set_alpha_to_one=True, timestep_spacing=spacing)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [4, 8, 10, 25])
def test_pndm_calls_the_model_where_pndm_does(diffusers, sched, mixture, spacing, n):
    """Three Runge-Kutta steps of four calls (t, twice half-way, t_next), then one call a step: n + 9 calls at
    diffusers' times, half-way points included (n = 8: T // n = 125 is odd)."""
    scheduler = _pndm_prk(diffusers, spacing)
    scheduler.set_timesteps(n)
    sampler = dk.get_sampler("pndm", sched, timestep_spacing=spacing)
    torch.testing.assert_close(sampler.timesteps(n), scheduler.timesteps.double(), rtol=0, atol=0)
    model = ExactDenoiserModel(mixture, sched)
    sampler.sample(model, _noise(n=4), num_steps=n)
    assert model.nfe == sampler.nfe(n) == len(scheduler.timesteps) == n + 9


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [8, 10])
def test_pndm_matches_diffusers_step_by_step(diffusers, sched, mixture, spacing, n):
    """In float64 with diffusers' abar table replaced by ours, every step agrees to 1e-10: diffusers' x after
    the 4th call of each Runge-Kutta step (calls 3, 7, 11), then after each multistep call, is our x per step."""
    scheduler = _pndm_prk(diffusers, spacing)
    scheduler.set_timesteps(n)
    scheduler.alphas_cumprod = sched.alphas_cumprod.clone()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    model, x_T = ExactDenoiserModel(mixture, sched), _noise()
    theirs = _theirs(scheduler, model, x_T, torch.float64)
    ours, _ = _ours(dk.get_sampler("pndm", sched, timestep_spacing=spacing), model, x_T, n)
    _assert_trajectories_close(ours, [theirs[i] for i in (3, 7, 11)] + theirs[12:], atol=1e-10)


# --- dpmpp_3m and dpmpp_3m_sde --------------------------------------------------------------

def _dpm_solver(diffusers, algorithm_type, spacing, prediction_type, karras=False, solver_type="midpoint"):
    return diffusers.DPMSolverMultistepScheduler(
        **SCHEDULE, solver_order=3, algorithm_type=algorithm_type, solver_type=solver_type,
        prediction_type=prediction_type, timestep_spacing=spacing, use_karras_sigmas=karras,
        final_sigmas_type="zero")


DPM_CASES = [(sp, pt, karras, n, "midpoint") for sp in SPACINGS for pt in ["epsilon", "sample", "v_prediction"]
             for karras in (False, True) for n in (10, 20)] + \
            [("trailing", "epsilon", False, n, "heun") for n in (10, 20)]


@pytest.mark.parametrize("spacing,prediction_type,karras,n,solver_type", DPM_CASES)
def test_dpmpp_3m_matches_diffusers_step_by_step(diffusers, sched, mixture, spacing, prediction_type, karras, n,
                                                 solver_type):
    """DPMSolverMultistepScheduler(solver_order=3): every step to 1e-5 (Karras: 1e-4, its sigma table
    is float32). 10 steps use diffusers' lower-order final steps, 20 steps third order to the end."""
    scheduler = _dpm_solver(diffusers, "dpmsolver++", spacing, prediction_type, karras, solver_type)
    scheduler.set_timesteps(n)
    model = ExactDenoiserModel(mixture, sched, prediction_type)
    x_T = _noise()
    options = {"use_karras_sigmas": True} if karras else {}
    sampler = dk.get_sampler("dpmpp_3m", sched, prediction_type=prediction_type, timestep_spacing=spacing,
                             solver_type=solver_type, **options)
    ours, _ = _ours(sampler, model, x_T, n)
    _assert_trajectories_close(ours, _theirs(scheduler, model, x_T), atol=1e-4 if karras else 1e-5)


def _sde_noises(seed, n, shape):
    """The normals our SDE draws, in order: one per step except the last (which lands on x0_pred)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n - 1)] + [torch.zeros(shape)]


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_3m_sde_matches_diffusers_with_the_same_noise(diffusers, sched, mixture, solver_type, prediction_type):
    """sde-dpmsolver++ fed our normals: 4 steps (orders 1, 2, 2, 1) agree step by step to 1e-5."""
    n, x_T = 4, _noise()
    scheduler = _dpm_solver(diffusers, "sde-dpmsolver++", "trailing", prediction_type, solver_type=solver_type)
    scheduler.set_timesteps(n)
    model = ExactDenoiserModel(mixture, sched, prediction_type)
    theirs = _theirs(scheduler, model, x_T, noises=_sde_noises(5, n, x_T.shape))
    sampler = dk.get_sampler("dpmpp_3m_sde", sched, prediction_type=prediction_type, solver_type=solver_type)
    ours, _ = _ours(sampler, model, x_T, n, generator=torch.Generator().manual_seed(5))
    _assert_trajectories_close(ours, theirs, atol=1e-5)


def test_dpmpp_3m_sde_third_order_step_differs_from_diffusers_only_in_d2(diffusers, sched, mixture):
    """At the first third-order step, ours - diffusers' = alpha_next * D2 exactly.

    The weight of D2 is -phi_3(h_eta) = (1 - e^{-2h} - 2h) / (2h)^2 + 1/2 here (k-diffusion's
    sample_dpmpp_3m_sde) and the same with -1/2 in diffusers' sde-dpmsolver++ third-order update;
    with the +1/2 the weight vanishes as h -> 0 (as the ODE's does), with -1/2 it tends to -1.
    """
    n, x_T = 10, _noise()
    scheduler = _dpm_solver(diffusers, "sde-dpmsolver++", "trailing", "epsilon")
    scheduler.set_timesteps(n)
    model = ExactDenoiserModel(mixture, sched)
    theirs = _theirs(scheduler, model, x_T, noises=_sde_noises(5, n, x_T.shape))
    sampler = dk.get_sampler("dpmpp_3m_sde", sched)
    ours, x0s = _ours(sampler, model, x_T, n, generator=torch.Generator().manual_seed(5))
    _assert_trajectories_close(ours[:2], theirs[:2], atol=1e-5)
    _, abars = sampler.plan(n)
    lam = [0.5 * math.log(float(a) / (1 - float(a))) for a in abars[:4]]
    h = lam[3] - lam[2]
    r0, r1 = (lam[2] - lam[1]) / h, (lam[1] - lam[0]) / h
    d1_0, d1_1 = (x0s[2] - x0s[1]) / r0, (x0s[1] - x0s[0]) / r1
    d2 = (d1_0 - d1_1) / (r0 + r1)
    expected = theirs[2].double() + math.sqrt(float(abars[3])) * d2
    torch.testing.assert_close(ours[2], expected, rtol=0, atol=1e-5)
    assert float(d2.abs().max()) > 100 * 1e-5, "D2 must be large enough for the check to mean something"


def test_dpmpp_3m_sde_with_eta_zero_is_dpmpp_3m(sched, mixture):
    model, x_T = ExactDenoiserModel(mixture, sched), _noise()
    ode = dk.get_sampler("dpmpp_3m", sched).sample(model, x_T, num_steps=12)
    sde = dk.get_sampler("dpmpp_3m_sde", sched, eta=0.0).sample(model, x_T, num_steps=12,
                                                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(ode, sde)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpmpp_3m_sde_gaussian_mean_and_variance(sched, eta):
    """Gaussian data N(m, s^2 I), exact denoiser: the samples' mean and variance are those of the
    exact reverse process run to the last model level abar_L and then denoised, i.e. m and
    abar_L s^4 / (abar_L s^2 + 1 - abar_L), within 5 standard errors (200 steps: the SDE's
    discretization bias is then below the sampling noise)."""
    m, s, n, steps = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.4, 20_000, 200
    model = ExactDenoiserModel(GaussianMixture(m[None], s), sched)
    sampler = dk.get_sampler("dpmpp_3m_sde", sched, eta=eta)
    x = sampler.sample(model, _noise(seed=3, n=n), num_steps=steps, generator=torch.Generator().manual_seed(0))
    a = float(sampler.plan(steps)[1][-2])
    var = a * s**4 / (a * s**2 + 1 - a)
    torch.testing.assert_close(x.mean(0), m, rtol=0, atol=5 * math.sqrt(var / n))
    torch.testing.assert_close(x.var(0), torch.full((2,), var, dtype=torch.float64), rtol=0,
                               atol=5 * var * math.sqrt(2 / n))


# --- deis -----------------------------------------------------------------------------------

DEIS_CASES = [(sp, pt, karras, n, order) for sp in SPACINGS for pt in ["epsilon", "sample", "v_prediction"]
              for karras in (False, True) for n in (10, 20) for order in (2, 3)]


@pytest.mark.parametrize("spacing,prediction_type,karras,n,order", DEIS_CASES)
def test_deis_matches_diffusers_step_by_step(diffusers, sched, mixture, spacing, prediction_type, karras, n, order):
    """DEISMultistepScheduler in float64 with its sigma table replaced by our exact values: every
    step but the last agrees to 1e-9 (it keeps sigmas in float32; as shipped see the next test).

    The last step differs on purpose: diffusers' DEIS ends at the noise level of t = 0 (and, with
    Karras sigmas, on a zero-length step) and returns that slightly noisy sample, with a third-order
    step from 15 steps on; ours, like DPM-Solver++ with final_sigmas_type="zero", steps to sigma = 0,
    which lands exactly on the last x0 prediction.
    """
    options = {"use_karras_sigmas": True} if karras else {}
    sampler = dk.get_sampler("deis", sched, prediction_type=prediction_type, timestep_spacing=spacing,
                             solver_order=order, **options)
    ts, abars = sampler.plan(n)
    scheduler = diffusers.DEISMultistepScheduler(**SCHEDULE, solver_order=order, prediction_type=prediction_type,
                                                 timestep_spacing=spacing, use_karras_sigmas=karras)
    scheduler.set_timesteps(n)
    torch.testing.assert_close(scheduler.timesteps.double(), ts, rtol=0, atol=0)
    scheduler.sigmas = torch.cat([((1 - abars[:-1]) / abars[:-1]).sqrt(), scheduler.sigmas[-1:].double()])
    model, x_T = ExactDenoiserModel(mixture, sched, prediction_type), _noise()
    ours, x0s = _ours(sampler, model, x_T, n)
    _assert_trajectories_close(ours[:-1], _theirs(scheduler, model, x_T, torch.float64)[:-1], atol=1e-9)
    assert torch.equal(ours[-1], x0s[-1])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_deis_matches_diffusers_as_shipped(diffusers, sched, mixture, spacing, karras):
    """diffusers' float32 tables and its default loop: every step but the last to 1e-4 (its
    coefficients are differences of float32 terms of size ~ rho log^2 rho; seen up to 7e-5)."""
    scheduler = diffusers.DEISMultistepScheduler(**SCHEDULE, solver_order=3, timestep_spacing=spacing,
                                                 use_karras_sigmas=karras)
    scheduler.set_timesteps(20)
    model, x_T = ExactDenoiserModel(mixture, sched), _noise()
    options = {"use_karras_sigmas": True} if karras else {}
    ours, _ = _ours(dk.get_sampler("deis", sched, timestep_spacing=spacing, **options), model, x_T, 20)
    _assert_trajectories_close(ours[:-1], _theirs(scheduler, model, x_T)[:-1], atol=1e-4)


# --- known answers --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plms", "pndm", "dpmpp_3m", "deis", "lms"])
@pytest.mark.parametrize("spacing", SPACINGS + ["logsnr"])
def test_gaussian_data_follows_the_exact_flow(sched, name, spacing):
    """Gaussian data N(m, s^2 I): the probability-flow ODE keeps z = (x - sqrt(abar) m) / sqrt(abar s^2 + 1 - abar)
    fixed, so every sample's exact path is known. Run to the level before the final step, each
    higher-order solver is at least 4x closer to it than first-order DDIM on the same grid, and
    the same denoiser written as an eps- or v-network gives the same samples.
    """
    m, s, steps = torch.tensor([[0.5, -0.3]], dtype=torch.float64), 0.4, 25
    x_T = _noise(seed=3, n=1000)

    def error(sampler_name, prediction_type="epsilon"):
        sampler = dk.get_sampler(sampler_name, sched, prediction_type=prediction_type, timestep_spacing=spacing)
        _, abars = sampler.plan(steps)
        a_T, a = float(abars[0]), float(abars[steps - 1])
        z = (x_T - math.sqrt(a_T) * m) / math.sqrt(a_T * s**2 + 1 - a_T)
        exact = math.sqrt(a) * m + math.sqrt(a * s**2 + 1 - a) * z
        model = ExactDenoiserModel(GaussianMixture(m, s), sched, prediction_type)
        x = sampler.sample(model, x_T, num_steps=steps, stop_step=steps - 1)
        return float((x - exact).abs().max()), x

    err, x_eps = error(name)
    err_ddim, _ = error("ddim")
    assert err < err_ddim / 4, f"{name} {spacing}: {err:.2e} vs DDIM {err_ddim:.2e}"
    _, x_v = error(name, "v_prediction")
    # (1e-6: logsnr's fractional times reach the network as float32, so its abar differs slightly)
    torch.testing.assert_close(x_v, x_eps, rtol=0, atol=1e-9 if spacing != "logsnr" else 1e-6)


def test_bad_options_name_the_option_and_allowed_values(sched):
    x = _noise(n=2)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(dk.ConfigError, match=r"solver_order=4.*\[1, 2, 3\]"):
        dk.get_sampler("deis", sched, solver_order=4).sample(zero, x, num_steps=3)
    with pytest.raises(dk.ConfigError, match="solver_type='bh2'.*midpoint"):
        dk.get_sampler("dpmpp_3m", sched, solver_type="bh2").sample(zero, x, num_steps=3)
    with pytest.raises(dk.ConfigError, match="has no option 'use_karras_sigmas'"):
        dk.get_sampler("plms", sched, use_karras_sigmas=True)
    with pytest.raises(dk.ConfigError, match="eta=2"):
        dk.get_sampler("dpmpp_3m_sde", sched, eta=2)
