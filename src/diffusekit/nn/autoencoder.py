"""The KL-regularised autoencoder of latent diffusion, and an adapter for diffusers' AutoencoderKL.

LDM (Rombach et al. 2022, sec. 3.1 and appendix G): a convolutional encoder maps an image
x (B, C, H, W) in [-1, 1] to the mean and log-variance of a diagonal Gaussian posterior
q(z | x) over latents (B, latent_channels, H / f, W / f), f = 2^(len(channel_mult) - 1); a
decoder maps latents back to images. Training minimises a reconstruction loss plus a small KL
to N(0, I), which keeps the latent space smooth without forcing it to be unit-variance; the
diffusion model then works on z * scaling_factor, where scaling_factor = 1 / std of the latents
over the data (LDM sec. 4.3.2, "rescale the latents"), so they have about unit variance.

Both autoencoders here share the pipeline's interface:
  encode(x, generator=None, sample=False) -> z   scaled latents (posterior mode, or a sample)
  decode(z) -> x                                  images from scaled latents
  latent_shape(image_shape) -> (c, h, w)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.nn.attention import AttentionBlock
from diffusekit.nn.layers import Downsample, GroupNorm, Upsample


@dataclass
class AutoencoderConfig(Config):
    """Shape and loss of the KL autoencoder; the defaults run on a laptop (factor 4, 4 latent channels)."""

    in_channels: int = 3
    base_channels: int = 64                # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)   # len - 1 = number of 2x downsamplings (2: factor 4, 3: factor 8)
    latent_channels: int = 4
    num_res_blocks: int = 1                # residual blocks per level (decoder: + 1)
    attention: bool = False                # self-attention in the middle blocks (lowest resolution)
    num_heads: int = 1
    groups: int = 32                       # GroupNorm groups
    kl_weight: float = 1e-6                # LDM's KL weight for its f4 / f8 autoencoders
    loss: Literal["l1", "mse"] = "l1"      # pixel reconstruction loss
    scaling_factor: float = 1.0            # z_diffusion = z * scaling_factor; set from compute_scaling_factor
    # LDM's patch-GAN term (training only; training/adversarial.py): weight on the adaptive-weighted hinge
    # generator loss, 0 = off (no discriminator at all); LDM uses 0.5
    adversarial_weight: float = 0.0
    adversarial_start: int = 0             # first optimiser step with the GAN term (and discriminator training)
    discriminator_channels: int = 32       # the PatchGAN's first width (doubling per layer, capped at 8x)
    discriminator_layers: int = 3          # its stride-2 convolutions: patches of H / 2^layers

    def validate(self) -> None:
        for name in ("in_channels", "base_channels", "latent_channels", "groups", "num_heads"):
            check_range(name, getattr(self, name), lo=1)
        check_range("num_res_blocks", self.num_res_blocks, lo=1)
        check_range("kl_weight", self.kl_weight, lo=0.0)
        check_range("scaling_factor", self.scaling_factor, lo=0.0, lo_open=True)
        if self.adversarial_weight < 0:
            raise ConfigError(f"adversarial_weight={self.adversarial_weight!r} is negative; use 0 (off) or a "
                              f"positive weight, such as LDM's 0.5.")
        check_range("adversarial_start", self.adversarial_start, lo=0)
        for name in ("discriminator_channels", "discriminator_layers"):
            check_range(name, getattr(self, name), lo=1)
        self.channel_mult = tuple(self.channel_mult)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult={self.channel_mult!r}; expected a non-empty tuple of positive ints.")
        for mult in self.channel_mult:
            ch = self.base_channels * mult
            if ch % self.groups:
                raise ConfigError(f"groups={self.groups} does not divide {ch} channels (base_channels="
                                  f"{self.base_channels} * {mult}); use a divisor of {ch}, such as 8.")
        top = self.base_channels * self.channel_mult[-1]
        if self.attention and top % self.num_heads:
            raise ConfigError(f"num_heads={self.num_heads} does not divide {top} channels; use a divisor.")

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.channel_mult) - 1)


class DiagonalGaussian:
    """A diagonal Gaussian N(mean, exp(logvar)) over latents (B, c, h, w): the encoder's posterior q(z | x)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        # clamp as LDM does: exp(logvar) neither underflows to 0 nor overflows early in training
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) from `generator` (drawn on the generator's device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent dimensions: (B,)."""
        # KL = 1/2 sum(mean^2 + var - 1 - logvar)   (Kingma & Welling 2014, appendix B)
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-conv, plus the input (1x1-projected when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _middle(cfg: AutoencoderConfig, ch: int) -> list[nn.Module]:
    attn = [AttentionBlock(ch, cfg.num_heads, cfg.groups)] if cfg.attention else []
    return [ResnetBlock(ch, ch, cfg.groups), *attn, ResnetBlock(ch, ch, cfg.groups)]


def build_encoder(cfg: AutoencoderConfig) -> nn.Sequential:
    """x (B, C, H, W) -> [mean, logvar] (B, 2 * latent_channels, H / f, W / f)."""
    ch = cfg.base_channels * cfg.channel_mult[0]
    layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch, 3, padding=1)]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers.append(ResnetBlock(ch, cfg.base_channels * mult, cfg.groups))
            ch = cfg.base_channels * mult
        if level < len(cfg.channel_mult) - 1:
            layers.append(Downsample(ch))
    layers += _middle(cfg, ch)
    layers += [GroupNorm(cfg.groups, ch), nn.SiLU(), nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def build_decoder(cfg: AutoencoderConfig) -> nn.Sequential:
    """z (B, latent_channels, h, w) -> x (B, C, h * f, w * f)."""
    ch = cfg.base_channels * cfg.channel_mult[-1]
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), *_middle(cfg, ch)]
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for _ in range(cfg.num_res_blocks + 1):
            layers.append(ResnetBlock(ch, cfg.base_channels * mult, cfg.groups))
            ch = cfg.base_channels * mult
        if level > 0:
            layers.append(Upsample(ch))
    layers += [GroupNorm(cfg.groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def check_image_shape(image_shape, channels: int, factor: int) -> tuple[int, int, int]:
    """(C, H, W) of an image (a leading batch dim is dropped), checked against the autoencoder."""
    shape = tuple(int(s) for s in image_shape)[-3:]
    if len(shape) != 3 or shape[0] != channels:
        raise ValueError(f"image shape {tuple(image_shape)}; the autoencoder expects ({channels}, H, W).")
    c, h, w = shape
    if h % factor or w % factor:
        ok = [max(factor, round(s / factor) * factor) for s in (h, w)]
        raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's downsampling factor {factor}; "
                         f"resize or crop to a multiple of {factor}, such as {ok[0]}x{ok[1]}.")
    return c, h, w


class KLAutoencoder(nn.Module):
    """KL-regularised convolutional autoencoder (LDM), GroupNorm + SiLU residual blocks."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) over unscaled latents; x (B, C, H, W) in [-1, 1]."""
        check_image_shape(x.shape, self.config.in_channels, self.config.downsample_factor)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Scaled latents z * scaling_factor: the posterior mode, or a sample from it if sample=True."""
        q = self.posterior(x)
        z = q.sample(generator) if sample else q.mode()
        return z * self.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), about [-1, 1] (not clamped), from scaled latents."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"latents have shape {tuple(z.shape)}; the autoencoder expects (B, {c}, h, w).")
        return self.decoder(z / self.config.scaling_factor)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """(latent_channels, H / f, W / f) for images of shape (C, H, W)."""
        _, h, w = check_image_shape(image_shape, self.config.in_channels, self.config.downsample_factor)
        f = self.config.downsample_factor
        return self.config.latent_channels, h // f, w // f

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss on a batch: (total, {"rec": ..., "kl": ...}), detached parts in the dict.

        total = rec + kl_weight * KL / (C * H * W), rec the mean L1 or squared error per pixel and KL
        the posterior's KL per image. This is LDM's sum-over-pixels loss divided by the pixel count,
        so kl_weight means what it means there (1e-6 for its f4 and f8 models).
        """
        total, rec, kl, _ = self.loss_terms(x, generator)
        return total, {"rec": rec.detach(), "kl": kl.detach()}

    def loss_terms(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(total, rec, kl, x_rec) of `loss`, undetached, with the reconstruction the adversarial term judges."""
        q = self.posterior(x)
        x_rec = self.decoder(q.sample(generator))
        err = (x_rec - x).abs() if self.config.loss == "l1" else (x_rec - x).pow(2)
        rec = err.mean()
        kl = q.kl().mean()
        total = rec + self.config.kl_weight * kl / x[0].numel()
        return total, rec, kl, x_rec

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution's weight: where LDM's adaptive weight compares gradient norms."""
        return self.decoder[-1].weight

    @staticmethod
    def compute_scaling_factor(latents_unscaled: torch.Tensor) -> float:
        """1 / std of unscaled latents over a data set (LDM sec. 4.3.2): scales them to about unit variance."""
        std = latents_unscaled.detach().double().std().item()
        if not std > 0:
            raise ValueError(f"the latents have std {std}; encode a varied batch of images (more than one, "
                             "not all equal) to compute the scaling factor.")
        return 1.0 / std

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --- a pretrained diffusers AutoencoderKL behind the same interface --------------------------

class DiffusersAutoencoder(nn.Module):
    """diffusers' AutoencoderKL with KLAutoencoder's encode / decode / latent_shape.

    z = (mode - shift_factor) * scaling_factor, as diffusers' pipelines scale (shift_factor 0
    when the model has none); decode inverts it.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None, shift_factor: float | None = None):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        shift = getattr(cfg, "shift_factor", None) if shift_factor is None else shift_factor
        self.shift_factor = float(shift or 0.0)
        self.in_channels, self.latent_channels = int(cfg.in_channels), int(cfg.latent_channels)
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        check_image_shape(x.shape, self.in_channels, self.downsample_factor)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents have shape {tuple(z.shape)}; the autoencoder expects "
                             f"(B, {self.latent_channels}, h, w).")
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        _, h, w = check_image_shape(image_shape, self.in_channels, self.downsample_factor)
        f = self.downsample_factor
        return self.latent_channels, h // f, w // f


def load_diffusers_autoencoder(path: str | Path, scaling_factor: float | None = None) -> DiffusersAutoencoder:
    """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), in eval mode."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file() or not any(path.glob("diffusion_pytorch_model*.safetensors")):
        raise ValueError(f"{path} is not a diffusers AutoencoderKL folder; expected config.json and "
                         "diffusion_pytorch_model.safetensors in it (as AutoencoderKL.save_pretrained writes).")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in (None, "AutoencoderKL"):
        raise ValueError(f"{config_file} describes a {class_name}, not an AutoencoderKL; point at the VAE folder "
                         "(in a Stable Diffusion repository: its vae/ sub-folder).")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("loading a diffusers autoencoder needs the `diffusers` package; "
                          "pip install diffusers.") from e
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
    return DiffusersAutoencoder(vae, scaling_factor)
