"""Image metrics: PSNR; sample quality: Frechet distance, KID and k-NN precision/recall on pluggable features.

Features come from a `FeatureExtractor` (the FID Inception network, nn.inception.InceptionFeatures; a trained classifier's
penultimate layer, or raw pixels). Statistics of a reference data set are cached on disk so that
evaluating many checkpoints extracts the reference features only once.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# PSNR


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; data_range 2 for images in [-1, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}.")
    mse = float(((a.double() - b.double()) ** 2).mean())
    # PSNR = 10 log10(range^2 / MSE)
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)



# ---------------------------------------------------------------------------------------------
# Frechet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64."""
    features = _as_2d_float64(features, "features")
    if features.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 samples to estimate a covariance; "
                         f"got features of shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1).reshape(
        features.shape[1], features.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix via eigh (negatives clipped)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^{1/2}) for PSD S1, S2, computed stably in float64.

    S1 S2 is similar to the symmetric PSD matrix A = S1^{1/2} S2 S1^{1/2}, so both have the same
    eigenvalues and tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A)). Working with symmetric A lets us
    use eigh; round-off can make tiny eigenvalues negative, which we clip to 0 (no complex parts).
    """
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    sqrt_sigma1 = _sqrt_psd(sigma1)
    a = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigvals = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Used as FID when the Gaussians are fitted to Inception pool3 features (Heusel et al. 2017).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance needs means of shape (F,) and covariances (F, F) with "
                         f"one F; got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}.")
    # d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})   (Dowson & Landau 1982)
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(fd), 0.0)  # the true value is >= 0; clip round-off below zero


# ---------------------------------------------------------------------------------------------
# Kernel inception distance


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # k(x, y) = (x.y / d + 1)^3   (Binkowski et al. 2018, KID)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    # MMD_u^2 = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 mean k(x_i,y_j)
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * _polynomial_kernel(x, y).mean())


def kid(fake_features, real_features, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: mean and std of the unbiased MMD^2 over random subsets.

    Each subset draws subset_size rows without replacement from each set, with a
    numpy Generator seeded by `seed` (Binkowski et al. 2018, "Demystifying MMD GANs").
    """
    fake = _as_2d_float64(fake_features, "fake_features")
    real = _as_2d_float64(real_features, "real_features")
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"fake and real features differ in width: {fake.shape} vs {real.shape}.")
    smallest = min(fake.shape[0], real.shape[0])
    if not 2 <= subset_size <= smallest:
        raise ValueError(f"subset_size={subset_size} must be in [2, {smallest}] (the size of the "
                         f"smaller feature set); pass subset_size={smallest} or use more samples.")
    if num_subsets < 1:
        raise ValueError(f"num_subsets={num_subsets} must be at least 1.")
    rng = np.random.default_rng(seed)
    mmds = np.array([
        _mmd2_unbiased(fake[rng.choice(fake.shape[0], subset_size, replace=False)],
                       real[rng.choice(real.shape[0], subset_size, replace=False)])
        for _ in range(num_subsets)])
    return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------------------------------------
# Precision and recall with k-NN manifolds


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b ; clamp because round-off can go slightly negative
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.T).clamp_min_(0)


def _knn_radii_squared(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row."""
    # the (k+1)-th smallest distance skips the row itself (distance 0)
    return torch.cat([_squared_distances(chunk, features).kthvalue(k + 1, dim=1).values
                      for chunk in features.split(batch_size)])


def _coverage(manifold: torch.Tensor, radii_sq: torch.Tensor, queries: torch.Tensor,
              batch_size: int) -> float:
    """Fraction of queries inside at least one ball B(manifold_i, radius_i)."""
    inside = [(_squared_distances(chunk, manifold) <= radii_sq[None]).any(dim=1)
              for chunk in queries.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(fake_features, real_features, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019, eq. 1-2).

    precision: share of fake samples inside the real manifold (union of balls around each real
    sample with radius its distance to the k-th nearest real neighbour); recall: share of real
    samples inside the fake manifold. Distances are computed in float64 in row batches.
    """
    fake = torch.from_numpy(_as_2d_float64(fake_features, "fake_features"))
    real = torch.from_numpy(_as_2d_float64(real_features, "real_features"))
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"fake and real features differ in width: {tuple(fake.shape)} vs "
                         f"{tuple(real.shape)}.")
    if not 1 <= k < min(fake.shape[0], real.shape[0]):
        raise ValueError(f"k={k} must be in [1, {min(fake.shape[0], real.shape[0]) - 1}] (fewer "
                         f"than the samples in each set); the paper uses k=3.")
    real_radii = _knn_radii_squared(real, k, batch_size)
    fake_radii = _knn_radii_squared(fake, k, batch_size)
    precision = _coverage(real, real_radii, fake, batch_size)
    recall = _coverage(fake, fake_radii, real, batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Feature extractors


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (B, C, H, W) in [-1, 1] to features (B, F); `name` keys the stats cache."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class RawPixelFeatures:
    """Flattened pixels as features: free to compute, a cheap fallback for tests and baselines."""

    name = "raw-pixels"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.detach().flatten(1).float().cpu()


class ClassifierFeatures:
    """Features from any module with a `features(x, t=None) -> (B, F)` method (e.g. a classifier).

    Images are moved to the device of the module's parameters, the module runs in eval mode
    (its training flag is restored afterwards), and features come back on the CPU as float32.
    Give `name` something that identifies the weights, e.g. the run name, so caches don't mix.
    """

    def __init__(self, model: torch.nn.Module, name: str | None = None):
        if not callable(getattr(model, "features", None)):
            raise TypeError(f"{type(model).__name__} has no features(x, t=None) method; wrap a "
                            f"module that returns (B, F) features, e.g. NoiseAwareClassifier.")
        self.model = model
        self.name = name or f"classifier-{type(model).__name__}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters(), None)
        if param is not None:
            images = images.to(param.device, param.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            features = self.model.features(images)
        finally:
            self.model.train(was_training)
        return features.flatten(1).float().cpu()


def extract_features(images, extractor: FeatureExtractor, batch_size: int = 256) -> np.ndarray:
    """Run extractor over images and return (N, F) float64 features.

    images: a tensor or array (N, C, H, W) in [-1, 1], or an iterable of batches, where a batch
    is a tensor or a tuple/list whose first item is the images (as a DataLoader yields).
    """
    out = []
    for batch in _iter_batches(images, batch_size):
        out.append(np.asarray(extractor(batch), dtype=np.float64))
    if not out:
        raise ValueError("extract_features got no images; check the data set is not empty.")
    return np.concatenate(out)


def _iter_batches(images, batch_size: int):
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield torch.as_tensor(batch)


# ---------------------------------------------------------------------------------------------
# Reference statistics cache and evaluation


@dataclass
class ReferenceStats:
    """Gaussian fit of the full reference set plus (possibly subsampled) raw features."""

    mu: np.ndarray        # (F,)
    sigma: np.ndarray     # (F, F)
    features: np.ndarray  # (M, F), M <= count, for KID and precision/recall
    count: int            # number of reference images the Gaussian was fitted to


def dataset_key(name: str, count: int) -> str:
    """A cache key naming the data set and how many images were used, e.g. 'mnist-test-n10000'."""
    return f"{name}-n{count}"


def reference_stats(images, extractor: FeatureExtractor, cache_dir: str | Path, key: str, *,
                    batch_size: int = 256, max_features: int | None = 10000,
                    seed: int = 0) -> ReferenceStats:
    """Reference-set statistics, read from cache_dir/<key>-<extractor.name>.npz when present.

    key must identify the data set and the image count (see dataset_key) since the cache is
    trusted by name. The Gaussian uses every image; only max_features rows (a seeded random
    subset) of the raw features are kept for KID and precision/recall.
    """
    for label, value in (("key", key), ("extractor.name", extractor.name)):
        if not re.fullmatch(r"[A-Za-z0-9._+=-]+", value):
            raise ValueError(f"{label}={value!r} is not usable in a file name; use letters, "
                             f"digits and . _ + = - only.")
    path = Path(cache_dir) / f"{key}-{extractor.name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            return ReferenceStats(cached["mu"], cached["sigma"], cached["features"],
                                  int(cached["count"]))
    features = extract_features(images, extractor, batch_size)
    mu, sigma = feature_stats(features)
    count = features.shape[0]
    if max_features is not None and count > max_features:
        keep = np.sort(np.random.default_rng(seed).choice(count, max_features, replace=False))
        features = features[keep]
    stats = ReferenceStats(mu, sigma, features, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write to a temporary file and rename, so an interrupted run never leaves a broken cache
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=features, count=np.int64(count))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats


def evaluate(fake_features, ref_features, *, k: int = 3, kid_subset_size: int = 1000,
             kid_num_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """fd, kid_mean, kid_std, precision and recall of fake features against a reference.

    ref_features: (N, F) features or a ReferenceStats (its full-set Gaussian gives fd; its kept
    features give KID and precision/recall). The KID subset size is capped at the smaller set.
    """
    fake = _as_2d_float64(fake_features, "fake_features")
    if isinstance(ref_features, ReferenceStats):
        mu_ref, sigma_ref, ref = ref_features.mu, ref_features.sigma, ref_features.features
    else:
        ref = _as_2d_float64(ref_features, "ref_features")
        mu_ref, sigma_ref = feature_stats(ref)
    mu_fake, sigma_fake = feature_stats(fake)
    subset_size = min(kid_subset_size, fake.shape[0], ref.shape[0])
    kid_mean, kid_std = kid(fake, ref, subset_size, kid_num_subsets, seed)
    precision, recall = precision_recall(fake, ref, k=k)
    return {"fd": frechet_distance(mu_fake, sigma_fake, mu_ref, sigma_ref),
            "kid_mean": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall}


def _as_2d_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N samples, F features); got shape {x.shape}.")
    return x
