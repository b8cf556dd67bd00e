"""Metrics: Frechet distance against closed forms, KID, k-NN precision/recall, the stats cache,
and the FID Inception plumbing (random weights; the real weights file is never needed)."""
import numpy as np
import pytest
import torch

from diffusekit.metrics import (ClassifierFeatures, FeatureExtractor,
                                RawPixelFeatures, ReferenceStats, dataset_key, evaluate,
                                extract_features, feature_stats, frechet_distance, kid,
                                precision_recall, reference_stats)
from diffusekit.nn.inception import (FID_WEIGHTS_FILE, FIDInceptionV3, InceptionFeatures, load_fid_inception,
                                     quantize_8bit)


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ---------------------------------------------------------------- Frechet distance


def test_fd_one_dimensional_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    m1, s1, m2, s2 = 0.3, 1.7, -1.1, 0.4
    fd = frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12)


def test_fd_commuting_covariances_closed_form():
    # S1 = U diag(a) U^T and S2 = U diag(b) U^T commute: tr sqrt(S1 S2) = sum sqrt(a_i b_i)
    rng = np.random.default_rng(0)
    d = 6
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = frechet_distance(mu1, (u * a) @ u.T, mu2, (u * b) @ u.T)
    assert fd == pytest.approx(expected, rel=1e-10)


def test_fd_matches_scipy_sqrtm_for_general_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    d = 5
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    # 50 samples in 200 dimensions: a singular covariance, where sqrtm-based code goes complex
    rng = np.random.default_rng(2)
    features = rng.standard_normal((50, 200))
    mu, sigma = feature_stats(features)
    fd = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= fd < 1e-8 * np.trace(sigma)


def test_fd_is_symmetric():
    rng = np.random.default_rng(3)
    mu1, s1 = feature_stats(rng.standard_normal((300, 8)))
    mu2, s2 = feature_stats(2.0 * rng.standard_normal((300, 8)) + 0.5)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_fd_estimate_converges_to_closed_form():
    rng = np.random.default_rng(4)
    d, n = 4, 20000
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.2, 0.0])
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    estimate = frechet_distance(*feature_stats(x), *feature_stats(y))
    exact = frechet_distance(mu1, s1, mu2, s2)
    # FD is a smooth function of the sample means and covariances, whose errors have standard
    # deviation O(scale / sqrt(n)) with scale = the trace terms plus the cross term
    # 2 |dmu| sqrt(lambda_max); the bias (tr S1 + tr S2) / n is far smaller. Allow 3 of those.
    scale = np.trace(s1) + np.trace(s2) + 2 * np.linalg.norm(mu1 - mu2) * np.sqrt(
        np.linalg.eigvalsh(s1 + s2).max())
    assert abs(estimate - exact) < 3 * scale / np.sqrt(n)


def test_feature_stats_shapes_and_errors():
    mu, sigma = feature_stats(np.arange(12.0).reshape(4, 3))
    assert mu.shape == (3,) and sigma.shape == (3, 3) and sigma.dtype == np.float64
    mu, sigma = feature_stats(np.arange(4.0).reshape(4, 1))
    assert sigma.shape == (1, 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="2-D"):
        feature_stats(np.zeros(5))


# ---------------------------------------------------------------- KID


def test_kid_single_subset_equals_unbiased_mmd_written_out():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 3)) + 0.3

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kid(x, y, subset_size=m, num_subsets=1)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    mean, std = kid(a, b, subset_size=500, num_subsets=50, seed=0)
    assert abs(mean) < 3 * std
    mean_shift, std_shift = kid(a, b + 0.5, subset_size=500, num_subsets=50, seed=0)
    assert mean_shift > 10 * std_shift and mean_shift > 10 * abs(mean)


def test_kid_is_reproducible_and_validates_subset_size():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((60, 4))
    assert kid(a, b, 20, 5, seed=3) == kid(a, b, 20, 5, seed=3)
    with pytest.raises(ValueError, match="subset_size=51"):
        kid(a, b, subset_size=51)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets_are_one():
    x = np.random.default_rng(8).standard_normal((300, 5))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_high_for_two_samples_of_one_distribution():
    rng = np.random.default_rng(9)
    precision, recall = precision_recall(rng.standard_normal((1000, 2)),
                                         rng.standard_normal((1000, 2)), k=3, batch_size=128)
    assert precision > 0.9 and recall > 0.9


def test_recall_drops_when_fake_collapses_to_one_mode():
    # real: 4 well separated modes in equal shares; fake: all samples from the first mode
    rng = np.random.default_rng(10)
    centers = 10 * np.eye(8)[:4]
    real = np.concatenate([c + rng.standard_normal((250, 8)) for c in centers])
    fake = centers[0] + rng.standard_normal((1000, 8))
    precision, recall = precision_recall(fake, real, k=3)
    assert recall < 0.35          # about the 1/4 of real samples from the covered mode
    assert precision > 0.7        # the fake samples are still realistic


# ---------------------------------------------------------------- extractors and cache


class CountingExtractor:
    """RawPixelFeatures that counts its calls."""

    name = "counting-raw"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return RawPixelFeatures()(images)


def test_extractors_follow_the_protocol():
    assert isinstance(RawPixelFeatures(), FeatureExtractor)
    assert isinstance(CountingExtractor(), FeatureExtractor)
    feats = RawPixelFeatures()(torch.zeros(3, 1, 4, 4))
    assert feats.shape == (3, 16) and feats.dtype == torch.float32


def test_classifier_features_duck_typed_and_restores_training_flag():
    class TinyClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5),
                                           torch.nn.Dropout(0.5))

        def features(self, x, t=None):
            return self.net(x)

    model = TinyClassifier().train()
    extractor = ClassifierFeatures(model, name="tiny")
    x = torch.randn(4, 1, 4, 4)
    feats = extractor(x)
    assert feats.shape == (4, 5) and model.training
    assert torch.equal(feats, extractor(x))  # eval mode: dropout off, deterministic
    with pytest.raises(TypeError, match="features"):
        ClassifierFeatures(torch.nn.Linear(2, 2))


def test_reference_stats_cache_round_trip(tmp_path):
    images = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    extractor = CountingExtractor()
    key = dataset_key("toy", len(images))
    first = reference_stats(images, extractor, tmp_path, key, batch_size=16, max_features=30)
    assert extractor.calls == 3  # batches of 16, 16, 8
    assert (tmp_path / f"{key}-counting-raw.npz").is_file()
    assert first.count == 40 and first.features.shape == (30, 16)
    mu, sigma = feature_stats(images.flatten(1).numpy())  # the Gaussian uses every image
    np.testing.assert_allclose(first.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(first.sigma, sigma, rtol=1e-5, atol=1e-7)

    second = reference_stats(images, extractor, tmp_path, key)
    assert extractor.calls == 3  # served from the cache
    for field in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    assert second.count == 40


def test_reference_stats_accepts_an_iterable_of_labelled_batches(tmp_path):
    images = torch.rand(10, 1, 2, 2) * 2 - 1
    batches = [(images[:6], torch.zeros(6)), (images[6:], torch.zeros(4))]
    stats = reference_stats(batches, RawPixelFeatures(), tmp_path, "toy-n10")
    np.testing.assert_allclose(stats.features, images.flatten(1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="file name"):
        reference_stats(batches, RawPixelFeatures(), tmp_path, "bad/key")


def test_evaluate_returns_all_metrics_and_uses_reference_stats():
    rng = np.random.default_rng(11)
    fake, real = rng.standard_normal((200, 4)), rng.standard_normal((300, 4))
    result = evaluate(fake, real, kid_num_subsets=10)
    assert set(result) == {"fd", "kid_mean", "kid_std", "precision", "recall"}
    stats = ReferenceStats(*feature_stats(real), features=real, count=300)
    assert evaluate(fake, stats, kid_num_subsets=10) == pytest.approx(result)


def test_extract_features_from_numpy():
    feats = extract_features(np.zeros((5, 1, 2, 2), np.float32), RawPixelFeatures(), batch_size=2)
    assert feats.shape == (5, 4) and feats.dtype == np.float64


# ---------------------------------------------------------------- FID Inception plumbing


@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)  # test-only: the network's default init uses the global RNG
    return FIDInceptionV3().eval()


def test_inception_random_init_gives_2048_features_for_gray_and_rgb(random_inception):
    extractor = InceptionFeatures(network=random_inception)
    for channels in (1, 3):
        feats = extractor(torch.rand(2, channels, 28, 28) * 2 - 1)
        assert feats.shape == (2, 2048) and feats.dtype == torch.float32
        assert torch.isfinite(feats).all()
    with pytest.raises(ValueError, match="1 or 3"):
        extractor(torch.zeros(2, 2, 8, 8))


def test_inception_state_dict_keys_and_strict_load(random_inception, tmp_path):
    state = random_inception.state_dict()
    # names of torchvision's Inception3 as used by pytorch-fid's weights file
    assert state["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state
    assert "Mixed_5b.branch5x5_2.conv.weight" in state
    assert not any(name.startswith("AuxLogits") for name in state)
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696),
    # plus 8 more classes in fc (8 * 2048 + 8) for the 1008-way FID graph
    assert sum(p.numel() for p in random_inception.parameters()) == 23_850_960

    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(state, path)
    loaded = load_fid_inception(path)  # torch.load(weights_only=True) + strict load
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), random_inception(x))
    assert InceptionFeatures(path).name == "inception-fid-pool3-u8"


def test_missing_inception_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_FILE) as info:
        InceptionFeatures(tmp_path / "nope.pth")
    assert "never downloads" in str(info.value) and "nope.pth" in str(info.value)
    with pytest.raises(ValueError, match="exactly one"):
        InceptionFeatures()


def test_quantize_8bit_against_a_hand_computation():
    # round((x + 1) * 127.5) / 255 by hand: -1 -> 0; 1 -> 255; 0 -> 127.5 -> 128 (half to even, as np.rint and
    # data.to_pixels); 0.5 -> 191.25 -> 191; -0.999 -> 0.1275 -> 0; out of range clamps first
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.999, 1.7, -3.0, 0.1])
    expected = torch.tensor([0, 255, 128, 191, 0, 255, 0, 140]) / 255     # 0.1: 140.25 -> 140
    assert torch.equal(quantize_8bit(x), expected)


class _Recorder(torch.nn.Module):
    """Stands in for the network: returns a digest of what it was given, and keeps it."""
    def forward(self, x):
        self.seen = x.clone()
        return x.mean(dim=(2, 3))


def test_inception_input_is_the_8bit_images_resized_as_pytorch_fid_does():
    """pytorch-fid reads a PNG as uint8 / 255 in [0, 1], resizes bilinearly (align_corners=False) to 299
    and scales by 2x - 1; the extractor does the same to images in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    recorder = _Recorder()
    InceptionFeatures(network=recorder)(images)
    pixels = torch.from_numpy(np.rint((images.numpy() + 1) * 127.5)).float() / 255      # a PNG's pixels, via numpy
    expected = 2 * torch.nn.functional.interpolate(pixels.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear",
                                                   align_corners=False) - 1
    assert recorder.seen.shape == (2, 3, 299, 299)
    torch.testing.assert_close(recorder.seen, expected, rtol=0, atol=1e-6)
    # a change smaller than half an 8-bit level does not reach the network
    nudged = quantize_8bit(images) * 2 - 1 + 0.3 / 255
    feats = InceptionFeatures(network=_Recorder())
    assert torch.equal(feats(nudged), feats(images))
