"""Noise-aware classifier: the UNet's encoder half plus a pooled linear head.

Trained on noised images x_t at random t, it gives log p(y | x_t, t) for classifier guidance
(Dhariwal & Nichol 2021, Alg. 1); trained on (or evaluated at) t = 0 it is the judge classifier,
and its penultimate `features` serve as FID-like features for small data sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.config import Config, check_range
from diffusekit.nn.embeddings import TimestepEmbedding, as_timestep_batch
from diffusekit.nn.unet import Encoder, GroupNorm, validate_layout


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

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "base_channels", "groups"):
            check_range(name, getattr(self, name), lo=1)
        check_range("num_classes", self.num_classes, lo=2)
        check_range("num_res_blocks", self.num_res_blocks, lo=0)
        check_range("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        validate_layout(self)

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
        self.num_features = ch

    def features(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """Penultimate features (B, F): the bottleneck, normalised, activated and averaged over H, W."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, H, W).")
        B = x.shape[0]
        temb = self.time_embed(as_timestep_batch(0.0 if t is None else t, B, x.device))
        h, _ = self.encoder(x, temb)
        return F.silu(self.out_norm(h)).mean(dim=(2, 3))              # (B, C, h, w) -> (B, C)

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        return self.head(self.features(x, t))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with requires_grad if trainable_only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
