"""Noise-aware classifier: the UNet's encoder half plus a pooled linear head.

Trained on noised images x_t at random t, it gives log p(y | x_t, t) for classifier guidance
(Dhariwal & Nichol 2021, Alg. 1); trained on (or evaluated at) t = 0 it is the judge classifier,
and its `features` serve as FID-like features for small data sets, in one of two views
(ClassifierConfig.features):

  "pooled"  the penultimate layer: the bottleneck, normalised, activated and averaged over space (C).
            Trained to tell the classes apart, it keeps little of how an image is drawn: on MNIST,
            blurred or alike ("typical") digits score under 2x the FD of real ones.
  "levels"  the pooled block plus, for every resolution level, the last activations of that level
            averaged over a 2x2 grid (before the class decision saturates them); each block is
            divided by its RMS standard deviation on training images (`calibrate_features`, run by
            the trainer), so no block's scale drowns the others in the Frechet distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.nn.embeddings import TimestepEmbedding, as_timestep_batch
from diffusekit.nn.unet import Encoder, GroupNorm, validate_layout

FEATURE_VIEWS = ("pooled", "levels")


@dataclass
class ClassifierConfig(Config):
    """Shape of the noise-aware classifier; layout fields mean what they mean in UNetConfig."""

    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 4
    head_dim: int = 0                      # > 0: channels per head, overriding num_heads
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    groups: int = 8
    max_period: float = 10000.0
    features: str = "pooled"               # the FD features: one of FEATURE_VIEWS (module doc)

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "base_channels", "groups"):
            check_range(name, getattr(self, name), lo=1)
        check_range("num_classes", self.num_classes, lo=2)
        check_range("num_res_blocks", self.num_res_blocks, lo=0)
        check_range("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        validate_layout(self)
        if self.features not in FEATURE_VIEWS:
            raise ConfigError(f"features={self.features!r} is not a feature view; use one of {list(FEATURE_VIEWS)} "
                              f"('levels' for an FD judge, 'pooled' for the penultimate layer alone).")

    @classmethod
    def from_unet(cls, unet_config, num_classes: int, **overrides) -> "ClassifierConfig":
        """The classifier whose encoder has the same layout as a UNetConfig's."""
        shared = {f: getattr(unet_config, f) for f in cls.__dataclass_fields__
                  if f != "num_classes" and hasattr(unet_config, f)}
        return cls(**{**shared, "num_classes": num_classes, **overrides})


class NoiseAwareClassifier(nn.Module):
    """Classify (possibly noised) images: `forward(x, t=None)` -> logits (B, num_classes).

    t is in training-timestep units like the UNet's; None means clean images (t = 0).
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = 4 * cfg.base_channels
        self.time_embed = TimestepEmbedding(cfg.base_channels, emb_dim, cfg.max_period)
        self.encoder = Encoder(cfg, cfg.in_channels, emb_dim, ctx_dim=None)
        ch = self.encoder.out_channels
        self.out_norm = GroupNorm(cfg.groups, ch)
        self.head = nn.Linear(ch, cfg.num_classes)
        self.level_taps = level_taps(cfg)
        self.num_features = ch
        if cfg.features == "levels":
            self.num_features += 4 * sum(self.encoder.skip_channels[i] for i in self.level_taps)
            # one divisor per block (pooled, then each level): set by calibrate_features, saved with the weights
            self.register_buffer("feature_scale", torch.ones(1 + len(self.level_taps)))

    def _encode(self, x: torch.Tensor, t) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(pooled penultimate (B, C), skip activations) of x at timestep t (None = clean)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, H, W).")
        temb = self.time_embed(as_timestep_batch(0.0 if t is None else t, x.shape[0], x.device))
        h, skips = self.encoder(x, temb)
        return F.silu(self.out_norm(h)).mean(dim=(2, 3)), skips       # (B, C, h, w) -> (B, C)

    def _blocks(self, pooled: torch.Tensor, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """The unscaled blocks of the "levels" view: pooled, then each level on a 2x2 grid (B, 4 C_level)."""
        return [pooled, *(F.adaptive_avg_pool2d(skips[i], 2).flatten(1) for i in self.level_taps)]

    def feature_blocks(self, x: torch.Tensor, t=None) -> list[torch.Tensor]:
        """The "levels" view's blocks before scaling, whatever this classifier's own view."""
        return self._blocks(*self._encode(x, t))

    def _view(self, pooled: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        if self.config.features == "pooled":
            return pooled
        blocks = self._blocks(pooled, skips)
        return torch.cat([b / s for b, s in zip(blocks, self.feature_scale)], dim=1)

    def features(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """FD features (B, num_features) in the config's view (module doc); "pooled" is the penultimate layer."""
        return self._view(*self._encode(x, t))

    def features_and_logits(self, x: torch.Tensor, t=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of one pass through the network."""
        pooled, skips = self._encode(x, t)
        return self._view(pooled, skips), self.head(pooled)

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        return self.head(self._encode(x, t)[0])

    @torch.no_grad()
    def calibrate_features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Set each block's divisor of the "levels" view to its RMS standard deviation over images (clean,
        t = 0; at least 2); returns the divisors. A block with no spread keeps divisor 1."""
        if self.config.features != "levels":
            raise ValueError(f"calibrate_features scales the 'levels' view; this classifier's view is "
                             f"{self.config.features!r}, which needs no calibration.")
        if len(images) < 2:
            raise ValueError(f"calibrate_features needs at least 2 images to measure a spread; got {len(images)}.")
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        try:
            parts = [self.feature_blocks(b.to(param.device, param.dtype)) for b in images.split(batch_size)]
        finally:
            self.train(was_training)
        scale = torch.stack([torch.cat(p).float().var(0).mean().sqrt() for p in zip(*parts)])
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        self.feature_scale.copy_(scale)
        return scale.clone()

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with requires_grad if trainable_only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def level_taps(cfg: ClassifierConfig) -> list[int]:
    """Indices into Encoder's skips of each resolution level's last activations (before its downsample)."""
    taps, index = [], 0
    for level in range(len(cfg.channel_mult)):
        index += cfg.num_res_blocks
        taps.append(index)
        if level < len(cfg.channel_mult) - 1:
            index += 1                                     # the Downsample's output
    return taps
