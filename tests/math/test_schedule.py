"""The forward process against closed forms (DDPM eq. 4 and 7, iDDPM eq. 17)."""
import math

import pytest
import torch

import diffusekit as dk
from diffusekit import schedule as S

KINDS = ["linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid"]


@pytest.mark.parametrize("kind", KINDS)
def test_alphas_cumprod_is_running_product_and_betas_in_unit_interval(kind):
    sched = dk.NoiseSchedule.create(kind, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    assert sched.betas.dtype == torch.float64 and len(sched.betas) == 1000
    assert bool((sched.betas > 0).all()) and bool((sched.betas < 1).all())
    torch.testing.assert_close(sched.alphas, 1 - sched.betas, rtol=0, atol=0)
    running = torch.ones((), dtype=torch.float64)
    for t in range(0, 1000):
        running = running * (1 - sched.betas[t])
        if t % 97 == 0:
            assert abs(float(sched.alphas_cumprod[t] - running)) < 1e-14
    assert bool((sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all())


def test_linear_and_scaled_linear_endpoints():
    lin = dk.NoiseSchedule.create("linear", 1000, 1e-4, 0.02)
    assert float(lin.betas[0]) == pytest.approx(1e-4) and float(lin.betas[-1]) == pytest.approx(0.02)
    sl = dk.NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    assert float(sl.betas[0]) == pytest.approx(0.00085) and float(sl.betas[-1]) == pytest.approx(0.012)
    assert float(sl.betas[500].sqrt()) == pytest.approx((0.00085**0.5 + 0.012**0.5) / 2, rel=1e-3)


def test_cosine_matches_closed_form_away_from_clipping():
    T, s = 1000, 0.008
    sched = dk.NoiseSchedule.create("cosine", T)
    t = torch.arange(T, dtype=torch.float64)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731  (iDDPM eq. 17)
    closed = f((t + 1) / T) / f(torch.zeros(1, dtype=torch.float64))
    unclipped = sched.betas < 0.999
    assert int(unclipped.sum()) > 990
    first_clip = int((~unclipped).nonzero()[0]) if bool((~unclipped).any()) else T
    torch.testing.assert_close(sched.alphas_cumprod[:first_clip], closed[:first_clip], rtol=1e-10, atol=1e-12)
    assert float(sched.betas.max()) <= 0.999


def test_zero_terminal_snr_rescale():
    base = dk.NoiseSchedule.create("linear")
    z = dk.NoiseSchedule.create("linear", rescale_zero_terminal_snr=True)
    assert float(z.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-9)


def test_add_noise_mean_and_variance():
    sched = dk.NoiseSchedule.create("linear")
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in [0, 10, 300, 999]:
        noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
        xt = sched.add_noise(x0, noise, torch.full((n,), t))
        abar = float(sched.alphas_cumprod[t])
        var = 1 - abar
        # standard errors of the sample mean and variance of n Gaussian draws
        assert abs(float(xt.mean()) - math.sqrt(abar) * 0.7) < 5 * math.sqrt(var / n)
        assert abs(float(xt.var()) - var) < 5 * var * math.sqrt(2 / n)


def test_add_noise_keeps_dtype_and_broadcasts_per_sample_t():
    sched = dk.NoiseSchedule.create("cosine")
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = sched.add_noise(x0, noise, t)
    assert xt.dtype == torch.float32 and xt.shape == x0.shape
    for i in range(3):
        ab = sched.alphas_cumprod[t[i]].float()
        torch.testing.assert_close(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i])


def test_posterior_equals_product_of_gaussians():
    sched = dk.NoiseSchedule.create("linear")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    for t in [1, 2, 50, 500, 999]:
        tt = torch.full((5,), t)
        mean, var = sched.posterior(x0, xt, tt)
        # Bayes: q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t)
        abar_prev = float(torch.prod(1 - sched.betas[:t]))
        beta = float(sched.betas[t])
        alpha = 1 - beta
        precision = 1 / (1 - abar_prev) + alpha / beta
        mean_ref = (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * xt / beta) / precision
        torch.testing.assert_close(mean, mean_ref, rtol=1e-9, atol=1e-10)
        assert float(var.flatten()[0]) == pytest.approx(1 / precision, rel=1e-9)


def test_prediction_conversions_round_trip():
    sched = dk.NoiseSchedule.create("cosine")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 100, 700, 990])
    xt = sched.add_noise(x0, eps, t)
    abar = S.extract(sched.alphas_cumprod, t, xt)
    torch.testing.assert_close(S.x0_from_eps(xt, eps, abar), x0)
    torch.testing.assert_close(S.eps_from_x0(xt, x0, abar), eps)
    v = sched.get_velocity(x0, eps, t)
    x0_v, eps_v = S.x0_eps_from_v(xt, v, abar)
    torch.testing.assert_close(x0_v, x0)
    torch.testing.assert_close(eps_v, eps)
    for pt in ["epsilon", "sample", "v_prediction"]:
        out = sched.training_target(pt, x0, eps, t)
        x0_c, eps_c = S.to_x0_eps(pt, out, xt, abar)
        torch.testing.assert_close(x0_c, x0)
        torch.testing.assert_close(eps_c, eps)


def test_respaced_plan_keeps_chosen_alphas_cumprod_exactly():
    sched = dk.NoiseSchedule.create("linear")
    for spacing in ["leading", "trailing", "linspace"]:
        ts, abars = dk.get_sampler("ddim", sched, timestep_spacing=spacing).plan(25)
        assert torch.equal(abars[:-1], sched.alphas_cumprod[ts.long()])
        assert float(abars[-1]) == 1.0


def test_sigma_t_round_trip():
    sched = dk.NoiseSchedule.create("linear")
    t = torch.tensor([0.0, 3.25, 400.5, 998.9])
    torch.testing.assert_close(sched.sigma_to_t(sched.sigmas[[0, 5, 500, 999]]),
                               torch.tensor([0.0, 5.0, 500.0, 999.0], dtype=torch.float64))
    # log-sigma interpolation inverts log-sigma interpolation; check monotone and close to t
    back = sched.sigma_to_t(sched.t_to_sigma(t))
    assert float((back - t.double()).abs().max()) < 0.05


def test_bad_schedule_arguments_name_the_allowed_values():
    with pytest.raises(dk.ConfigError, match="kind='cosin'.*cosine"):
        dk.NoiseSchedule.create("cosin")
    with pytest.raises(dk.ConfigError, match="beta_end"):
        dk.NoiseSchedule.create("linear", beta_end=1.5)
    with pytest.raises(dk.ConfigError, match="num_train_timesteps"):
        dk.NoiseSchedule.create("linear", num_train_timesteps=1)


@pytest.mark.parametrize("kind,theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                         ("cosine", "squaredcos_cap_v2"), ("sigmoid", "sigmoid")])
def test_matches_diffusers_schedules(kind, theirs):
    diffusers = pytest.importorskip("diffusers")
    ours = dk.NoiseSchedule.create(kind, 1000, 1e-4, 0.02)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=theirs)
    # diffusers computes in float32; we compute in float64
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


def test_epsilon_prediction_on_a_zero_terminal_snr_schedule_is_refused_with_the_fix():
    # x0 = (x_T - eps) / sqrt(abar_T) at abar_T = 0: DDIM and DDPM return NaN, the solvers noise
    from diffusekit.pipeline import Pipeline
    from diffusekit.training.resolve import resolve_run_config
    zsnr = dk.NoiseSchedule.create("linear", num_train_timesteps=100, rescale_zero_terminal_snr=True)
    model = lambda x, t, **c: 0.5 * x       # noqa: E731
    with pytest.raises(dk.ConfigError, match="v_prediction"):
        Pipeline(model, zsnr, image_shape=(1, 4, 4), prediction_type="epsilon")
    with pytest.raises(dk.ConfigError, match="divides by zero"):
        resolve_run_config({"schedule.rescale_zero_terminal_snr": True, "model.prediction_type": "epsilon"})
    for prediction_type in ("v_prediction", "sample"):
        pipe = Pipeline(model, zsnr, image_shape=(1, 4, 4), prediction_type=prediction_type)
        assert torch.isfinite(pipe.sample(2, "ddim", 5, generator=torch.Generator().manual_seed(0))).all()
        resolve_run_config({"schedule.rescale_zero_terminal_snr": True, "model.prediction_type": prediction_type})
