"""What a diffusion run draws and scores while it trains: sample grids and FD/KID of its EMA model.

`SampleGrid` samples a fixed set of noise images (and classes or captions) with the EMA model
through a `Pipeline` (pipeline.py: the one sampling path, so grids look as `sample` draws them);
`RunEvaluator` scores the EMA model against the training data's statistics with raw-pixel
features (Frechet distance and KID, diffusekit.metrics).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from diffusekit.seeding import derive_seed
from diffusekit.viz import save_grid


def reference_images(dataset, limit: int = 5000) -> torch.Tensor:
    """Up to `limit` training images (N, C, H, W) in [-1, 1]: all of an in-memory set, the first ones streamed."""
    if hasattr(dataset, "images"):
        return dataset.images[:limit]
    return torch.stack([dataset.item(i, None)[0] for i in range(min(limit, len(dataset)))])


class RunEvaluator:
    """FD and KID of n samples of a Pipeline against raw-pixel statistics of the training images."""

    def __init__(self, images: torch.Tensor, n: int = 256, num_steps: int = 20, sampler: str = "dpmpp_2m",
                 seed: int = 0):
        from diffusekit.metrics import RawPixelFeatures, extract_features, feature_stats
        self.extractor = RawPixelFeatures()
        self.ref_features = extract_features(images[:5000], self.extractor)
        self.ref_mu, self.ref_sigma = feature_stats(self.ref_features)
        self.n, self.num_steps, self.sampler, self.seed = n, num_steps, sampler, seed

    @torch.no_grad()
    def __call__(self, pipe) -> dict:
        from diffusekit.metrics import extract_features, feature_stats, frechet_distance, kid
        labels = torch.arange(self.n) % pipe.num_classes if pipe.num_classes else None
        x = pipe.sample(self.n, self.sampler, self.num_steps, generator=torch.Generator().manual_seed(self.seed),
                        class_labels=labels)
        fake = extract_features(x, self.extractor)
        mu, sigma = feature_stats(fake)
        kid_mean, _ = kid(fake, self.ref_features, subset_size=min(100, self.n), num_subsets=20, seed=self.seed)
        return {"fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma), "kid": kid_mean}


class SampleGrid:
    """Sample a fixed set of noise images (and classes or captions) with the EMA model and save a grid."""

    def __init__(self, cfg, schedule, device: torch.device, autoencoder, dataset):
        tc, m = cfg.train, cfg.model
        n = tc.num_sample_images
        self.shape = (m.in_channels, m.image_size, m.image_size)
        g = torch.Generator().manual_seed(derive_seed(tc.seed, "grid"))
        self.x_T = torch.randn((n, *self.shape), generator=g)
        self.labels = torch.arange(n) % m.num_classes if m.num_classes else None
        captions = getattr(dataset, "captions", None) if cfg.text is not None else None
        self.prompts = [captions[i % len(captions)] for i in range(n)] if captions else None
        self.nrow = m.num_classes if 0 < m.num_classes <= 16 else math.ceil(math.sqrt(n))
        self.cfg, self.schedule, self.device, self.autoencoder = cfg, schedule, device, autoencoder

    @torch.no_grad()
    def save(self, ema_model: torch.nn.Module, path: Path, precision: str) -> Path:
        pipe = grid_pipeline(self.cfg, self.schedule, ema_model, self.device, self.autoencoder, precision)
        g = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.train.seed, "grid-sampler"))
        x = pipe.sample(len(self.x_T), self.cfg.train.sample_sampler, self.cfg.train.sample_steps, generator=g,
                        class_labels=self.labels, noise=self.x_T, prompt=self.prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(x, path, nrow=self.nrow)


def grid_pipeline(cfg, schedule, model, device, autoencoder, precision: str):
    """A Pipeline around the model being trained (its EMA copy), for grids and evaluation."""
    from diffusekit.pipeline import Pipeline
    m, c = cfg.model, cfg.latent
    shape = (m.in_channels, m.image_size, m.image_size)
    pixels = (c.channels, c.image_size, c.image_size) if c is not None else shape
    return Pipeline(model, schedule, image_shape=pixels, latent_shape=shape, prediction_type=m.prediction_type,
                    num_classes=m.num_classes, device=device, precision=precision, autoencoder=autoencoder)
