"""How well an autoencoder reconstructs: held-out PSNR, the reconstruction grid, the latent scaling factor.

`ReconstructionEvaluator` is what the autoencoder trainer measures at each save: PSNR of the EMA
weights on held-out images, their grid (originals over reconstructions), and at the end the
latent scaling factor 1 / std(z) over a seeded choice of training images (LDM sec. 4.3.2).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.device import autocast
from diffusekit.metrics import psnr
from diffusekit.nn.autoencoder import KLAutoencoder
from diffusekit.seeding import derive_seed
from diffusekit.viz import save_grid


@torch.no_grad()
def _map_batches(fn, images: torch.Tensor, batch_size: int, device: torch.device, precision: str) -> torch.Tensor:
    """fn applied to images in batches on `device` under autocast; float32 results on the CPU."""
    out = []
    for x in images.split(batch_size):
        with autocast(device, precision):
            out.append(fn(x.to(device)).float().cpu())
    return torch.cat(out)


def reconstruct(autoencoder, images: torch.Tensor, batch_size: int = 250, precision: str = "fp32") -> torch.Tensor:
    """decode(encode(x)) of images (N, C, H, W) in [-1, 1] (posterior modes), clamped to [-1, 1], on the CPU."""
    device = next(autoencoder.parameters()).device
    return _map_batches(lambda x: autoencoder.decode(autoencoder.encode(x)), images, batch_size, device,
                        precision).clamp(-1, 1)


def reconstruction_psnr(autoencoder, images: torch.Tensor, batch_size: int = 250, precision: str = "fp32") -> float:
    """PSNR in dB of the reconstructions over all pixels of the images (data range 2 for [-1, 1])."""
    return psnr(reconstruct(autoencoder, images, batch_size, precision), images)


def latent_scaling_factor(autoencoder: KLAutoencoder, images: torch.Tensor, batch_size: int = 250,
                          precision: str = "fp32") -> float:
    """1 / std of the unscaled latents (posterior modes, what encode caches) of the images (LDM sec. 4.3.2)."""
    device = next(autoencoder.parameters()).device
    latents = _map_batches(lambda x: autoencoder.posterior(x).mode(), images, batch_size, device, precision)
    return KLAutoencoder.compute_scaling_factor(latents)


def save_reconstruction_grid(images: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             per_row: int = 8) -> Path:
    """A grid of rows of up to per_row originals, each row followed by a row of their reconstructions."""
    rows = [t for a, b in zip(images.split(per_row), reconstructions.split(per_row)) for t in (a, b)]
    nrow = min(per_row, len(images))
    padded = [torch.cat([r, -torch.ones(nrow - len(r), *r.shape[1:])]) for r in rows]  # short last pair: black
    return save_grid(torch.cat(padded), path, nrow=nrow)


class ReconstructionEvaluator:
    """Held-out PSNR and grid images, and the training images the scaling factor is taken over."""

    def __init__(self, cfg, train_images: torch.Tensor, held_images: torch.Tensor):
        tc = cfg.train
        self.tc, self.held = tc, held_images[:tc.eval_images or None]
        self.grid_images = held_images[:tc.num_grid_images]
        n = tc.scaling_images or len(train_images)
        if n < len(train_images):
            g = torch.Generator().manual_seed(derive_seed(tc.seed, "scaling"))
            train_images = train_images[torch.randperm(len(train_images), generator=g)[:n].sort().values]
        self.scaling = train_images

    def psnr(self, model) -> float:
        return reconstruction_psnr(model, self.held, self.tc.eval_batch_size, self.tc.precision)

    def grid(self, model, path: Path) -> Path:
        rec = reconstruct(model, self.grid_images, self.tc.eval_batch_size, self.tc.precision)
        return save_reconstruction_grid(self.grid_images, rec, path)

    def scaling_factor(self, model) -> float:
        return latent_scaling_factor(model, self.scaling, self.tc.eval_batch_size, self.tc.precision)
