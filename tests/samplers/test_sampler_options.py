"""The diffusers-named sampler options: x0_pred bounds, steps_offset, set_alpha_to_one, init_noise_sigma.

Known answers written out here, independently of the code; diffusers itself is compared in
tests/interop/test_diffusers_fidelity.py.
"""
import math

import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError
from diffusekit.samplers.clipping import X0Bounds, dynamic_threshold

SCHEDULE = dk.NoiseSchedule.create("linear")


def _far_model(x, t):
    # eps = 0.9 x + 0.1: x0_pred leaves [-1, 1] at every noisy step, so any bound acts
    return 0.9 * x + 0.1


def test_dynamic_threshold_against_its_definition():
    """Imagen: s = max(1, min(quantile_p |x0|, max_value)) per image; x0 -> clamp(x0, -s, s) / s."""
    x0 = torch.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    x0[1] *= 0.5                                     # a second image with a smaller spread: its own s
    out = dynamic_threshold(x0, 0.9, 2.5)
    for k in range(2):
        flat = x0[k].flatten().abs().sort().values
        position = 0.9 * (len(flat) - 1)             # linear interpolation between order statistics
        lo = int(math.floor(position))
        q = flat[lo] + (position - lo) * (flat[lo + 1] - flat[lo])
        s = min(max(float(q), 1.0), 2.5)
        torch.testing.assert_close(out[k], x0[k].clamp(-s, s) / s)
    assert float(out.abs().max()) <= 1.0 + 1e-6
    small = torch.full((1, 1, 2, 2), 0.3)            # s clamps to 1: nothing changes inside [-1, 1]
    torch.testing.assert_close(dynamic_threshold(small, 0.995, 1.0), small)


def test_clip_sample_acts_on_a_denoiser_passed_in():
    """Pipeline.sample hands samplers a Denoiser; the sampler's clip_sample must bound it too (it was ignored)."""
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    clipped = dk.get_sampler("ddim", SCHEDULE, clip_sample=True, clip_sample_range=0.5)
    via_model = clipped.sample(_far_model, x_T, num_steps=5)
    via_denoiser = clipped.sample(dk.Denoiser(_far_model, "epsilon"), x_T, num_steps=5)
    torch.testing.assert_close(via_denoiser, via_model)
    assert float(via_model.abs().max()) <= 0.5 + 1e-6       # the last DDIM step lands on the clipped x0_pred
    free = dk.get_sampler("ddim", SCHEDULE).sample(_far_model, x_T, num_steps=5)
    assert float(free.abs().max()) > 1.0


def test_keeping_the_network_eps_is_the_ddim_update_with_the_unclipped_eps():
    """use_clipped_model_output=False: one DDIM step is sqrt(abar_prev) clip(x0) + sqrt(1 - abar_prev) eps_model."""
    sampler = dk.get_sampler("ddim", SCHEDULE, timestep_spacing="leading", clip_sample=True,
                             use_clipped_model_output=False)
    ts, abars = sampler.plan(4)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    a, a_prev = float(abars[0]), float(abars[1])
    eps = _far_model(x, None)
    x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(sampler.sample(_far_model, x, num_steps=4, stop_step=1), expected)
    with pytest.raises(ConfigError, match="use_clipped_model_output=False.*'euler'"):
        dk.get_sampler("euler", SCHEDULE, clip_sample=True, use_clipped_model_output=False)


def test_steps_offset_and_set_alpha_to_one_place_the_plan():
    sampler = dk.get_sampler("plms", SCHEDULE, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    ts, abars = sampler.plan(10)
    assert ts.tolist() == [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    # the last level is abar_0 = 1 - beta_0, not a clean sample
    assert float(abars[-1]) == pytest.approx(1 - 1e-4, abs=1e-12)
    assert float(dk.get_sampler("plms", SCHEDULE).plan(10)[1][-1]) == 1.0
    with pytest.raises(ConfigError, match="steps_offset=1 acts on timestep_spacing='leading' only"):
        dk.get_sampler("ddim", SCHEDULE, timestep_spacing="trailing", steps_offset=1)
    with pytest.raises(ConfigError, match="places a timestep at 1000"):
        dk.get_sampler("ddim", SCHEDULE, timestep_spacing="leading", steps_offset=1).plan(1000)
    with pytest.raises(ConfigError, match="has no option 'set_alpha_to_one'"):
        dk.get_sampler("euler", SCHEDULE, set_alpha_to_one=False)


def test_init_noise_sigma_scales_the_start():
    """euler: "exact" starts at x_T sqrt(1 + sigma^2), "sigma_max" at x_T sigma; one step then differs by that ratio."""
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  (eps = 0: Euler keeps x in sigma space)
    exact = dk.get_sampler("euler", SCHEDULE, timestep_spacing="linspace").sample(zero, x_T, num_steps=3)
    sigma_max = dk.get_sampler("euler", SCHEDULE, timestep_spacing="linspace", init_noise_sigma="sigma_max")
    sigma = float(SCHEDULE.sigmas[-1])
    torch.testing.assert_close(sigma_max.sample(zero, x_T, num_steps=3), exact * sigma / math.sqrt(1 + sigma**2))
    assert X0Bounds().active is False
