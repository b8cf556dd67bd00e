"""evaluate_run reports the metrics of the images it generated against the reference it names.

An evaluation that compared the reference with itself, or scored other images than it generated,
would still return finite numbers; these tests pin the numbers down instead: the reference scored
against itself gives FD 0 and precision = recall = 1, an affine copy a*x + b of it gives the
closed-form FD, and a real pipeline's result equals frechet_distance / kid / precision_recall
computed directly on the images it produced. Planted in a scratch copy, "score the reference's own
features" fails here.
"""
import numpy as np
import pytest
import torch

import diffusekit as dk
from diffusekit import metrics as M
from diffusekit.data import DataConfig, load_dataset
from diffusekit.evaluation import evaluate_run
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline

N_REF = 120                    # a small reference keeps KID (100 subsets) and precision/recall cheap
KW = dict(features="raw", seed=0, batch_size=50, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """numpy's OpenBLAS started with a thread per core before conftest could say otherwise; on a busy
    machine its threads contend for the tiny KID matrix products (30x slower measured here)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """120 random 8x8 images (blobs of varying brightness) written as a .npy reference set, and
    those images in [-1, 1] as the data loader gives them."""
    g = torch.Generator().manual_seed(0)
    blobs = torch.rand(N_REF, 1, 1, 1, generator=g) * torch.exp(-torch.linspace(-2, 2, 8).pow(2))[None, None]
    pixels = (blobs * blobs.transpose(2, 3) + 0.2 * torch.rand(N_REF, 1, 8, 8, generator=g)).clamp(0, 1)
    path = tmp_path_factory.mktemp("ref") / "blobs.npy"
    np.save(path, pixels[:, 0].numpy())                          # (N, 8, 8) floats in [0, 1]
    ref = DataConfig(source=str(path))
    images = load_dataset(ref).images
    torch.testing.assert_close(images, pixels * 2 - 1, rtol=0, atol=1e-6)
    return ref, images


class Replay:
    """A stand-in pipeline whose "samples" are given images, handed out in order."""
    model, device, num_classes = None, "cpu", 0

    def __init__(self, images):
        self.images, self.next, self.image_shape = images, 0, tuple(images.shape[1:])

    def sample(self, n, **kwargs):
        out = self.images[self.next:self.next + n]
        self.next += n
        return out

    def sampler_for(self, name, **options):
        return dk.get_sampler(name, dk.NoiseSchedule.create("linear", 100), **options)


def features(images) -> np.ndarray:
    return images.reshape(len(images), -1).double().numpy()


def test_the_reference_against_itself_scores_zero_and_an_affine_copy_the_closed_form(reference, tmp_path):
    ref, images = reference
    same = evaluate_run(Replay(images), ref, N_REF, cache_dir=tmp_path, **KW)
    # FD of identical Gaussians is 0 (round-off in the matrix square root is ~1e-7 here)
    assert same["fd"] < 1e-5 and same["precision"] == same["recall"] == 1.0
    assert same["n"] == same["ref_count"] == N_REF

    a, b = 0.5, -0.25                    # stays inside [-1, 1], so evaluate_run's clamp does nothing
    shifted = evaluate_run(Replay(a * images + b), ref, N_REF, cache_dir=tmp_path, **KW)
    x = features(images)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    # N(a mu + b, a^2 S) against N(mu, S): |(a - 1) mu + b|^2 + tr(S + a^2 S - 2 |a| S)   (Dowson & Landau)
    closed_form = float(np.sum(((a - 1) * mu + b) ** 2) + (1 - abs(a)) ** 2 * np.trace(sigma))
    assert closed_form > 1.0
    assert shifted["fd"] == pytest.approx(closed_form, rel=1e-6)
    kid_mean, kid_std = M.kid(features(a * images + b), x, N_REF, 100, seed=KW["seed"])
    assert (shifted["kid_mean"], shifted["kid_std"]) == pytest.approx((kid_mean, kid_std), rel=1e-9)
    assert shifted["kid_mean"] > 10 * abs(same["kid_mean"])


def test_a_pipelines_result_is_the_metrics_of_the_images_it_generated(reference, tmp_path):
    ref, images = reference
    torch.manual_seed(0)
    config = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_heads=2, groups=4, num_classes=10)
    pipe = Pipeline(UNet(config), dk.NoiseSchedule.create("linear", 100), image_shape=(1, 8, 8), num_classes=10)
    seen = []
    real_sample = pipe.sample
    pipe.sample = lambda *args, **kwargs: seen.append((kwargs.get("class_labels"), real_sample(*args, **kwargs))) \
        or seen[-1][1]
    result = evaluate_run(pipe, ref, 40, sampler="ddim", num_steps=3, cache_dir=tmp_path, **{**KW, "batch_size": 16})
    labels = torch.cat([y for y, _ in seen])
    generated = torch.cat([x for _, x in seen]).float().clamp(-1, 1)
    assert generated.shape == (40, 1, 8, 8) and torch.equal(labels.cpu(), torch.arange(40) % 10)

    fake, real = features(generated), features(images)
    assert result["fd"] == pytest.approx(M.frechet_distance(*M.feature_stats(fake), *M.feature_stats(real)),
                                         rel=1e-9)
    kid_mean, kid_std = M.kid(fake, real, 40, 100, seed=KW["seed"])
    assert (result["kid_mean"], result["kid_std"]) == pytest.approx((kid_mean, kid_std), rel=1e-9)
    assert (result["precision"], result["recall"]) == pytest.approx(M.precision_recall(fake, real, k=3), rel=1e-12)
    assert result["nfe"] == 3 and result["n"] == 40
