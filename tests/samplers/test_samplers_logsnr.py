"""The log-SNR timestep spacing (timestep_spacing="logsnr"), an option of ours beyond diffusers'."""
import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError
from diffusekit.samplers.base import SAMPLERS, TIMESTEP_SPACINGS
from diffusekit.toy import ExactDenoiserModel, GaussianMixture, sliced_wasserstein

DETERMINISTIC = [name for name, spec in SAMPLERS.items() if not spec.stochastic]


@pytest.fixture(scope="module")
def schedule():
    return dk.NoiseSchedule.create("linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("n", [1, 2, 7, 25])
def test_logsnr_plan_is_uniform_in_log_snr(schedule, name, n):
    sampler = dk.get_sampler(name, schedule, timestep_spacing="logsnr")
    ts, abars = sampler.plan(n)
    assert ts.shape == (n,) and abars.shape == (n + 1,) and abars[-1] == 1.0
    assert ts[0] == schedule.num_train_timesteps - 1
    assert bool((ts.diff() < 0).all())
    # the solver steps with the noise level the model is called at
    torch.testing.assert_close(abars[:-1], schedule.alpha_bar_at(ts), rtol=0, atol=0)
    # lambda = log(abar / (1 - abar)) spans [lambda(T-1), lambda(0)] in equal steps; solver style
    # divides it into n steps and drops t = 0, the others into n - 1 steps and keep t = 0
    lam = lambda a: torch.log(a) - torch.log1p(-a)  # noqa: E731
    lam_min, lam_max = lam(schedule.alphas_cumprod[-1]), lam(schedule.alphas_cumprod[0])
    points = n + 1 if sampler.spec.style == "solver" else n
    if points > 1:
        expected = lam_min + (lam_max - lam_min) * torch.arange(n, dtype=torch.float64) / (points - 1)
        # sigma_to_t and alpha_bar_at interpolate sigma slightly differently between integer steps
        torch.testing.assert_close(lam(abars[:-1]), expected, rtol=0, atol=2e-2)
    if sampler.spec.style != "solver" and n > 1:
        assert ts[-1] == 0


def test_logsnr_nfe_counts_heun_honestly(schedule):
    sampler = dk.get_sampler("heun", schedule, timestep_spacing="logsnr")
    assert sampler.nfe(5) == 9 and len(sampler.timesteps(5)) == 9


def test_logsnr_and_karras_conflict(schedule):
    with pytest.raises(ConfigError, match="logsnr"):
        dk.get_sampler("dpmpp_2m", schedule, timestep_spacing="logsnr", use_karras_sigmas=True)


def test_unknown_spacing_lists_allowed_values(schedule):
    with pytest.raises(ConfigError, match="logsnr") as err:
        dk.get_sampler("unipc", schedule, timestep_spacing="log_snr")
    for spacing in TIMESTEP_SPACINGS:
        assert spacing in str(err.value)


def test_diffusers_spacings_unchanged(schedule):
    """Adding logsnr leaves the diffusers-style spacings' plans alone (spot check)."""
    from diffusekit.samplers.base import spaced_timesteps
    for name in DETERMINISTIC:
        sampler = dk.get_sampler(name, schedule, timestep_spacing="trailing")
        ts, _ = sampler.plan(10)
        torch.testing.assert_close(ts, spaced_timesteps(1000, 10, "trailing", sampler.spec.style))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_logsnr_reproduces_gaussian_mixture(schedule, name):
    """With the exact denoiser and 50 steps, samples match the mixture within the two-sample noise."""
    mixture = GaussianMixture.random(2, 4, torch.Generator().manual_seed(0), spread=1.0, std=0.2)
    model = ExactDenoiserModel(mixture, schedule, "epsilon")
    n = 1500
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64)
    truth, other = mixture.sample(n, generator=g), mixture.sample(n, generator=g)
    sampler = dk.get_sampler(name, schedule, timestep_spacing="logsnr")
    x = sampler.sample(model, x_T, num_steps=50)
    proj = 128
    floor = sliced_wasserstein(other, truth, proj, generator=torch.Generator().manual_seed(2))
    dist = sliced_wasserstein(x, truth, proj, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(x).all()
    assert dist < 2.5 * floor + 0.01, (name, dist, floor)


def test_logsnr_gaussian_data_mean_and_variance(schedule):
    """Gaussian data N(m, s^2): a 2nd-order solver on the logsnr grid returns that mean and variance."""
    mixture = GaussianMixture(torch.tensor([[0.5, -0.3]]), 0.4)
    model = ExactDenoiserModel(mixture, schedule, "epsilon")
    x_T = torch.randn(20000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = dk.get_sampler("unipc", schedule, timestep_spacing="logsnr").sample(model, x_T, num_steps=20)
    # standard errors: s / sqrt(N) = 0.0028 for the mean, s^2 sqrt(2 / N) = 0.0016 for the variance
    torch.testing.assert_close(x.mean(0), torch.tensor([0.5, -0.3], dtype=torch.float64), rtol=0, atol=0.012)
    torch.testing.assert_close(x.var(0), torch.full((2,), 0.16, dtype=torch.float64), rtol=0, atol=0.008)
