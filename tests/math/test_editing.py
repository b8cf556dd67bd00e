"""Editing on the exact Gaussian-mixture denoiser: SDEdit endpoints, DDIM inversion round trip, inpainting."""
import math

import pytest
import torch

import diffusekit as dk
from diffusekit.editing import inpaint, invert, reconstruct, sdedit
from diffusekit.metrics import psnr
from diffusekit.toy import ExactDenoiserModel, GaussianMixture

SCHED = dk.NoiseSchedule.create("linear", 1000)


def gmm_setup(seed=0, n=64, prediction_type="epsilon"):
    """A 16-dim mixture, images (n, 1, 4, 4) drawn from it, and its exact model."""
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture.random(16, 4, g, spread=1.0, std=0.3)
    images = gmm.sample(n, generator=g).float().reshape(n, 1, 4, 4)
    return ExactDenoiserModel(gmm, SCHED, prediction_type), images


# --- SDEdit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_ancestral"])
def test_sdedit_endpoints(name):
    model, images = gmm_setup()
    sampler = dk.get_sampler(name, SCHED)
    assert torch.equal(sdedit(sampler, model, images, 0.0, 10, torch.Generator().manual_seed(0)), images)
    # S = 1: plain sampling from the same generator's noise, bit for bit (stochastic samplers too)
    out = sdedit(sampler, model, images, 1.0, 10, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(images.shape, generator=g)
    assert torch.equal(out, sampler.sample(model, x_T, 10, generator=g))


def test_sdedit_moves_further_from_the_input_as_strength_grows():
    model, images = gmm_setup(n=128)
    sampler = dk.get_sampler("ddim", SCHED)
    dist = [float((sdedit(sampler, model, images, s, 20, torch.Generator().manual_seed(1)) - images)
                  .flatten(1).norm(dim=1).mean()) for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > 0


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_sdedit_strength_out_of_range(strength):
    model, images = gmm_setup(n=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sdedit(dk.get_sampler("ddim", SCHED), model, images, strength, 10)


# --- DDIM inversion -------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inversion_reconstructs_and_refinement_is_near_exact(prediction_type):
    model, images = gmm_setup(prediction_type=prediction_type)
    scores = {}
    ddim = dk.get_sampler("ddim", SCHED, prediction_type=prediction_type, eta=0.0)
    for refine in (0, 4):
        seen = []
        x_T = invert(ddim, model, images, 20, refine_steps=refine, callback=lambda info: seen.append(info.i))
        assert x_T.shape == images.shape and bool(torch.isfinite(x_T).all())
        assert seen == list(range(20))      # one StepInfo per inverse step, like sampling
        scores[refine] = psnr(reconstruct(ddim, model, x_T, 20), images)
    assert scores[0] > 20, scores
    assert scores[4] > 40 and scores[4] > scores[0] + 10, scores


def test_inverted_latent_is_noise_like():
    # the probability-flow ODE maps the data distribution to N(0, I); the data have std ~0.4 per coordinate
    model, images = gmm_setup(n=256)
    x_T = invert(dk.get_sampler("ddim", SCHED), model, images, 50)
    assert abs(float(x_T.mean())) < 0.1 and abs(float(x_T.std()) - 1) < 0.1


def test_psnr_closed_form():
    a = torch.zeros(2, 1, 4, 4)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))
    with pytest.raises(ValueError, match="shapes"):
        psnr(a, torch.zeros(2, 1, 4, 5))


# --- inpainting -----------------------------------------------------------------------------

def correlated_setup(n=200, a=0.5):
    """Two components with means +a and -a in all 16 dims: one half of an image tells the other's sign."""
    gmm = GaussianMixture(torch.stack([torch.full((16,), a), torch.full((16,), -a)]), 0.3)
    images = gmm.sample(n, generator=torch.Generator().manual_seed(0)).float().reshape(n, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1                                                   # fill the right half
    return ExactDenoiserModel(gmm, SCHED), images, mask


def sign_agreement(out, images):
    known, filled = images[..., :2].mean((1, 2, 3)), out[..., 2:].mean((1, 2, 3))
    return float(((known > 0) == (filled > 0)).float().mean())


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "unipc"])
def test_inpainting_keeps_known_pixels_and_conditions_the_fill(name):
    model, images, mask = correlated_setup()
    out = inpaint(dk.get_sampler(name, SCHED), model, images, mask, 20, torch.Generator().manual_seed(1))
    assert torch.equal(out[..., :2], images[..., :2])
    assert bool(torch.isfinite(out).all()) and float(out[..., 2:].abs().max()) < 3
    # unconditional samples would agree half the time; the known half must decide the filled one
    assert sign_agreement(out, images) > 0.85


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun", "dpmpp_2m"])
def test_repaint_resampling_harmonises_better(name):
    model, images, mask = correlated_setup()
    sampler = dk.get_sampler(name, SCHED)
    plain = inpaint(sampler, model, images, mask, 20, torch.Generator().manual_seed(1))
    repaint = inpaint(sampler, model, images, mask, 20, torch.Generator().manual_seed(1), resample=3)
    assert torch.equal(repaint[..., :2], images[..., :2]) and bool(torch.isfinite(repaint).all())
    assert sign_agreement(repaint, images) >= max(sign_agreement(plain, images), 0.97)


def test_inpainting_mask_extremes():
    model, images, _ = correlated_setup(n=8)
    sampler = dk.get_sampler("ddim", SCHED)
    keep_all = inpaint(sampler, model, images, torch.zeros_like(images), 10, torch.Generator().manual_seed(2))
    assert torch.equal(keep_all, images)
    # fill everything with deterministic DDIM: plain sampling from the same starting noise
    fill_all = inpaint(sampler, model, images, torch.ones(1, 1, 4, 4), 10, torch.Generator().manual_seed(2))
    x_T = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fill_all, sampler.sample(model, x_T, 10))


def test_inpainting_bad_inputs():
    model, images, _ = correlated_setup(n=2)
    sampler = dk.get_sampler("ddim", SCHED)
    with pytest.raises(ValueError, match=r"\(1, 1, 5, 5\).*\(2, 1, 4, 4\)"):
        inpaint(sampler, model, images, torch.zeros(1, 1, 5, 5), 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inpaint(sampler, model, images, torch.full((1, 1, 4, 4), 2.0), 10)
    with pytest.raises(ValueError, match="resample"):
        inpaint(sampler, model, images, torch.zeros(1, 1, 4, 4), 10, resample=0)


def test_inversion_refuses_a_non_ddim_sampler():
    model, images = gmm_setup()
    with pytest.raises(ValueError, match="deterministic DDIM"):
        invert(dk.get_sampler("ddim", SCHED, eta=0.5), model, images, 10)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        invert(dk.get_sampler("euler", SCHED), model, images, 10)


@pytest.mark.parametrize("name", sorted(dk.SAMPLERS))
def test_stop_step_returns_vp_x_at_that_level_and_continuing_matches(name):
    # running steps [0, k) then [k, n) equals one run of [0, n) for one-step samplers; every sampler
    # returns x in the VP convention at abars[k] (checked via the deterministic samplers' first step)
    model, images = gmm_setup()
    s = dk.get_sampler(name, SCHED)
    x_T = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    seen = []
    full = s.sample(model, x_T, 6, generator=g1, callback=lambda info: seen.append(info.x.clone()))
    part = s.sample(model, x_T, 6, generator=g2, stop_step=1)
    torch.testing.assert_close(part, seen[0])       # the callback sees VP x; stop_step returns the same
    if not s.spec.stochastic and name in ("ddim", "euler", "heun"):
        rest = s.sample(model, part, 6, start_step=1)
        torch.testing.assert_close(rest, full, rtol=1e-5, atol=1e-5)
