"""The training-time evaluator (train.eval_every) scores the images it sampled: FD against a closed form.

RunEvaluator's FD of an affine copy a*x + b of the reference images is, for Gaussians fitted to the
raw pixels, |(a - 1) mu + b|^2 + (1 - |a|)^2 tr(S) (Dowson & Landau), computed here with numpy alone;
a wrong covariance (or scoring the reference against itself) gives another number.
"""
import numpy as np
import pytest
import torch

from diffusekit import metrics as M
from diffusekit.training.samples import RunEvaluator


class Replay:
    """A stand-in Pipeline whose samples are the given images; records what it was asked for."""
    num_classes = 0

    def __init__(self, images):
        self.images, self.calls = images, []

    def sample(self, n, sampler, num_steps, generator=None, class_labels=None):
        self.calls.append((n, sampler, num_steps, class_labels))
        return self.images[:n]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    return (0.6 * torch.rand(200, 1, 1, 1, generator=g) * ramp + 0.2 * torch.randn(200, 1, 4, 4, generator=g)).clamp(-1, 1)


def test_fd_of_an_affine_copy_is_the_closed_form(images):
    judge = RunEvaluator(images, n=200, num_steps=3, sampler="ddim")
    a, b = 0.5, 0.3
    pipe = Replay(a * images + b)
    result = judge(pipe)
    assert pipe.calls == [(200, "ddim", 3, None)]
    x = images.flatten(1).double().numpy()
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    closed_form = float(np.sum(((a - 1) * mu + b) ** 2) + (1 - abs(a)) ** 2 * np.trace(sigma))
    assert closed_form > 0.1
    # the features are float32 pixels: agreement to ~1e-7 relative, far inside what a wrong covariance moves
    assert result["fd"] == pytest.approx(closed_form, rel=1e-5)
    kid_mean, _ = M.kid((a * x + b), x, subset_size=100, num_subsets=20, seed=0)
    assert result["kid"] == pytest.approx(kid_mean, rel=1e-5)


def test_the_reference_against_itself_scores_zero(images):
    result = RunEvaluator(images, n=200)(Replay(images))
    assert abs(result["fd"]) < 1e-6
