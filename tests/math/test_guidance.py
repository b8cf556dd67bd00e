"""Guidance wrappers: CFG endpoints and batching, exact classifier guidance, loss guidance that steers."""
import math

import pytest
import torch
from torch import nn

import diffusekit as dk
from diffusekit.guidance import (ClassifierFreeGuidance, ClassifierGuidance, GradientGuidance, classifier_loss,
                                 mean_intensity_loss)
from diffusekit.schedule import x0_from_eps
from diffusekit.toy import ExactDenoiserModel, GaussianMixture

SCHED = dk.NoiseSchedule.create("linear", 1000)


class TinyCondNet(nn.Module):
    """A random class-conditional conv net; label -1 (or num_classes) is the null class."""

    def __init__(self, num_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, 4)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)
        self.calls, self.batch_sizes = 0, []

    def forward(self, x, t, class_labels):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        labels = torch.where(class_labels < 0, torch.full_like(class_labels, self.num_classes), class_labels)
        h = self.conv_in(x) + self.emb(labels)[:, :, None, None] + 1e-3 * t[:, None, None, None]
        return self.conv_out(torch.tanh(h))


class TwoClassToy(nn.Module):
    """Exact class-conditional eps for two Gaussian classes; the null label gives the mixture's eps."""

    def __init__(self, mu, std, schedule=SCHED):
        super().__init__()
        self.mu, self.std = mu, std
        self.cls = [ExactDenoiserModel(GaussianMixture(m[None], std), schedule) for m in (mu, -mu)]
        self.uncond = ExactDenoiserModel(GaussianMixture(torch.stack([mu, -mu]), std), schedule)
        self.calls, self.batch_sizes = 0, []

    def forward(self, x, t, class_labels=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        out = self.uncond(x, t)
        if class_labels is not None:
            for k, m in enumerate(self.cls):
                sel = (class_labels == k).reshape(-1, *[1] * (x.ndim - 1))
                out = torch.where(sel, m(x, t), out)
        return out


def exact_classifier(toy: TwoClassToy, schedule=SCHED):
    """log p(y | x_t, t) up to a constant for the toy: x_t | y ~ N(sqrt(abar) mu_y, (abar s^2 + 1 - abar) I)."""
    means = torch.stack([toy.mu, -toy.mu])                              # (2, d)

    def classifier(x, t):
        abar = schedule.alpha_bar_at(t.double().cpu()).reshape(-1, 1, 1).to(x.dtype)
        var = abar * toy.std**2 + 1 - abar
        diff = x.reshape(x.shape[0], 1, -1) - abar.sqrt() * means.to(x.dtype)[None]   # (B, 2, d)
        return -0.5 * (diff**2).sum(-1) / var[:, :, 0]
    return classifier


def projection(x, toy, labels):
    """Signed distance along the requested class's direction: +|mu| at the class mean."""
    u = (toy.mu / toy.mu.norm()).double()
    sign = 1.0 - 2.0 * labels.double()                                  # class 0 -> +1, class 1 -> -1
    return (x.double().reshape(x.shape[0], -1) @ u) * sign


# --- classifier-free guidance ----------------------------------------------------------

def test_cfg_scale_zero_is_unconditional_and_one_is_conditional():
    net = TinyCondNet()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 1, 6, 6, generator=g), torch.full((5,), 321.0)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        uncond = net(x, t, class_labels=torch.full_like(y, -1))
        cond = net(x, t, class_labels=y)
        torch.testing.assert_close(ClassifierFreeGuidance(net, 0.0)(x, t, class_labels=y), uncond,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ClassifierFreeGuidance(net, 1.0)(x, t, class_labels=y), cond,
                                   rtol=1e-6, atol=1e-6)
        # w = 3: the extrapolation eps_u + w (eps_c - eps_u)
        torch.testing.assert_close(ClassifierFreeGuidance(net, 3.0)(x, t, class_labels=y),
                                   uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
        # null label given as num_classes instead of -1
        torch.testing.assert_close(ClassifierFreeGuidance(net, 0.0, null_label=3)(x, t, class_labels=y), uncond,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_cfg_on_raw_output_equals_cfg_on_eps_for_every_prediction_type(prediction_type):
    # mixing v (or x0) outputs is the same as mixing the eps they imply: the maps are affine at fixed x_t
    net = TinyCondNet(seed=1)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    y, t, abar, w = torch.tensor([0, 1, 2, 1]), torch.tensor(500.0), float(SCHED.alphas_cumprod[500]), 2.5
    with torch.no_grad():
        mixed_out = dk.Denoiser(ClassifierFreeGuidance(net, w), prediction_type)(x, t, abar, class_labels=y)
        den = dk.Denoiser(net, prediction_type)
        p_c, p_u = den(x, t, abar, class_labels=y), den(x, t, abar, class_labels=torch.full_like(y, -1))
        torch.testing.assert_close(mixed_out.eps, p_u.eps + w * (p_c.eps - p_u.eps), rtol=1e-4, atol=1e-4)
        mixed_pred = ClassifierFreeGuidance(den, w)(x, t, abar, class_labels=y)     # CFG around a Denoiser
        torch.testing.assert_close(mixed_pred.eps, mixed_out.eps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed_pred.x0, mixed_out.x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m"])
def test_cfg_makes_one_batched_model_call_per_evaluation(name):
    toy = TwoClassToy(torch.full((4,), 0.5), 0.5)
    sampler = dk.get_sampler(name, SCHED)
    x_T = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(ClassifierFreeGuidance(toy, 2.0), x_T, 8, class_labels=torch.tensor([0, 1] * 3))
    assert toy.calls == sampler.nfe(8)
    assert toy.batch_sizes == [12] * toy.calls
    assert out.shape == x_T.shape and bool(torch.isfinite(out).all())


def test_cfg_pushes_samples_toward_the_requested_class():
    toy = TwoClassToy(torch.tensor([0.5, 0.5]), 0.5)      # overlapping classes: guidance has room to act
    sampler = dk.get_sampler("ddim", SCHED)
    B = 256
    labels = torch.arange(B) % 2
    x_T = torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proj, frac = {}, {}
    for w in (0.0, 1.0, 3.0):
        x = sampler.sample(ClassifierFreeGuidance(toy, w), x_T, 20, class_labels=labels)
        p = projection(x, toy, labels)
        proj[w], frac[w] = float(p.mean()), float((p > 0).double().mean())
    assert abs(proj[0.0]) < 0.15                                         # unconditional: no preference
    assert proj[1.0] == pytest.approx(float(toy.mu.norm()), abs=0.15)    # conditional: the class mean
    assert proj[3.0] > proj[1.0] + 0.3
    assert frac[0.0] < frac[1.0] < frac[3.0] and frac[3.0] > 0.95


def test_cfg_needs_a_condition_to_drop():
    with pytest.raises(ValueError, match="class_labels"):
        ClassifierFreeGuidance(TinyCondNet(), 2.0)(torch.zeros(2, 1, 4, 4), torch.zeros(2))


# --- classifier guidance ----------------------------------------------------------------

@pytest.mark.parametrize("t", [50, 400, 900])
def test_classifier_guidance_with_exact_classifier_is_the_conditional_model(t):
    # Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t), so scale 1 is exact
    toy = TwoClassToy(torch.tensor([0.6, -0.2, 0.4]), 0.4)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    y = torch.arange(8) % 2
    abar = SCHED.alphas_cumprod[t]
    guided = ClassifierGuidance(dk.Denoiser(toy.uncond), exact_classifier(toy), 1.0)(x, torch.tensor(float(t)),
                                                                                    abar, class_labels=y)
    target = dk.Denoiser(toy)(x, torch.tensor(float(t)), abar, class_labels=y)
    torch.testing.assert_close(guided.eps, target.eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guided.x0, target.x0, rtol=1e-9, atol=1e-9)


def test_classifier_guidance_scale_sharpens_class_membership():
    toy = TwoClassToy(torch.tensor([0.5, 0.5]), 0.5)
    sampler = dk.get_sampler("ddim", SCHED)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    frac = {}
    for scale in (0.0, 1.0, 4.0):
        guided = ClassifierGuidance(dk.Denoiser(toy.uncond), exact_classifier(toy), scale, target_class=0)
        x = sampler.sample(guided, x_T, 20)
        frac[scale] = float((projection(x, toy, torch.zeros(256, dtype=torch.long)) > 0).double().mean())
    assert 0.35 < frac[0.0] < 0.65
    assert frac[0.0] + 0.2 < frac[1.0] < frac[4.0]


# --- gradient guidance ------------------------------------------------------------------

def _gmm_model(d=16, seed=0):
    gmm = GaussianMixture.random(d, 4, torch.Generator().manual_seed(seed), spread=1.0, std=0.3)
    return ExactDenoiserModel(gmm, SCHED)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_mean_intensity_guidance_moves_sample_mean_toward_target(name):
    model, target = _gmm_model(), 0.6
    sampler = dk.get_sampler(name, SCHED)
    x_T = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    plain = sampler.sample(model, x_T, 15)
    guided = sampler.sample(GradientGuidance(dk.Denoiser(model), mean_intensity_loss(target), 100.0), x_T, 15)
    assert bool(torch.isfinite(guided).all())
    gap_plain, gap_guided = abs(float(plain.mean()) - target), abs(float(guided.mean()) - target)
    assert gap_guided < 0.5 * gap_plain


def test_colour_target_moves_each_channel_its_own_way():
    model = _gmm_model(d=8, seed=2)                 # images (B, 2, 2, 2): two channels
    sampler = dk.get_sampler("ddim", SCHED)
    x_T = torch.randn(128, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    plain = sampler.sample(model, x_T, 15).mean((0, 2, 3))
    guided = sampler.sample(GradientGuidance(dk.Denoiser(model), mean_intensity_loss([0.7, -0.7]), 100.0),
                            x_T, 15).mean((0, 2, 3))
    assert float(guided[0]) > float(plain[0]) + 0.2 and float(guided[1]) < float(plain[1]) - 0.2


def test_t_window_outside_the_schedule_changes_nothing():
    model = _gmm_model()
    sampler = dk.get_sampler("ddim", SCHED)
    x_T = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))
    plain = sampler.sample(model, x_T, 10)
    off = GradientGuidance(dk.Denoiser(model), mean_intensity_loss(0.6), 100.0, t_window=(2000, 3000))
    assert torch.equal(sampler.sample(off, x_T, 10), plain)
    # a window covering part of the plan does change the result, and only from its first step on
    part = GradientGuidance(dk.Denoiser(model), mean_intensity_loss(0.6), 100.0, t_window=(0, 400))
    assert not torch.equal(sampler.sample(part, x_T, 10), plain)


@pytest.mark.parametrize("weighting", ["sqrt_abar", "constant", "one_minus_abar", lambda t, abar: 0.5])
def test_guided_prediction_keeps_x0_and_eps_consistent(weighting):
    model = _gmm_model()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    abar = SCHED.alphas_cumprod[300]
    base = dk.Denoiser(model)(x, torch.tensor(300.0), abar)
    pred = GradientGuidance(dk.Denoiser(model), mean_intensity_loss(0.5), 10.0, weighting=weighting)(
        x, torch.tensor(300.0), abar)
    abar_b = torch.full((4, 1), float(abar), dtype=torch.float64)
    torch.testing.assert_close(pred.x0, x0_from_eps(x, pred.eps, abar_b))
    assert not torch.allclose(pred.eps, base.eps)
    assert not pred.eps.requires_grad and not pred.x0.requires_grad


def test_classifier_loss_guide_pulls_toward_the_target_class():
    toy = TwoClassToy(torch.tensor([0.5, 0.5]), 0.5)
    sampler = dk.get_sampler("ddim", SCHED)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    zeros = torch.zeros(256, dtype=torch.long)
    plain = float((projection(sampler.sample(toy.uncond, x_T, 20), toy, zeros) > 0).double().mean())
    guide = GradientGuidance(dk.Denoiser(toy.uncond), classifier_loss(exact_classifier(toy), target_class=0), 3.0)
    guided = float((projection(sampler.sample(guide, x_T, 20), toy, zeros) > 0).double().mean())
    assert guided > plain + 0.2


def test_bad_guidance_arguments_say_what_to_do():
    model = _gmm_model()
    with pytest.raises(TypeError, match="Denoiser"):
        GradientGuidance(model, mean_intensity_loss(0.0), 1.0)
    with pytest.raises(ValueError, match="sqrt_abar"):
        GradientGuidance(dk.Denoiser(model), mean_intensity_loss(0.0), 1.0, weighting="linear")
    with pytest.raises(ValueError, match="t_min"):
        GradientGuidance(dk.Denoiser(model), mean_intensity_loss(0.0), 1.0, t_window=(500, 100))
    with pytest.raises(ValueError, match="channels"):
        mean_intensity_loss([0.1, 0.2, 0.3])(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="target_class"):
        classifier_loss(lambda x, t: x)(torch.zeros(2, 3))


def test_closed_form_of_mean_intensity_loss():
    x0 = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(mean_intensity_loss(1.0)(x0), torch.tensor([1.0, 1.0]))
    img = torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), -0.5)])[None]   # (1, 2, 2, 2)
    torch.testing.assert_close(mean_intensity_loss([0.0, 0.0])(img), torch.tensor([0.5]))
    assert math.isclose(float(mean_intensity_loss([0.5, -0.5])(img)), 0.0)


def test_gradient_guides_work_under_no_grad_and_refuse_inference_mode():
    toy = TwoClassToy(torch.tensor([0.5, 0.5]), 0.5)
    clf = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))       # a random classifier(x, t)
    classifier = lambda x, t: clf(x.float()).to(x.dtype)                   # noqa: E731
    sampler = dk.get_sampler("euler", SCHED)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = sampler.sample(toy.uncond, x_T, 5)
        for guided in (ClassifierGuidance(dk.Denoiser(toy.uncond), classifier, 5.0, target_class=1),
                       GradientGuidance(dk.Denoiser(toy.uncond), classifier_loss(classifier, 1), 5.0)):
            out = sampler.sample(guided, x_T, 5)
            assert bool(torch.isfinite(out).all()) and not torch.allclose(out, plain)
    assert all(p.grad is None for p in clf.parameters())                   # only x_t was differentiated
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        sampler.sample(ClassifierGuidance(dk.Denoiser(toy.uncond), classifier, 1.0, target_class=1), x_T, 5)
