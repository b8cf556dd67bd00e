"""The UNet's shape as a typed config: named presets, layout checks (sizes, groups, heads) with fixes.

`UNetConfig` is what config.json's `model` section holds (nn/unet.py builds the network from it);
`validate_layout` checks any UNet-like config (the classifier's too) before a layer is built.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.schedule import PredictionType

PRESETS: dict[str, dict] = {
    # 8x8 sklearn digits, 1 channel: fast on a 2-core CPU
    "tiny8": dict(image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=4, groups=8),
    "small16": dict(image_size=16, in_channels=3, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                    attention_resolutions=(8,), num_heads=4, groups=16),
    # MNIST / Fashion-MNIST: 28 -> 14 -> 7
    "mnist28": dict(image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(7,), num_heads=4, groups=8),
    # the same depth with the channels moved to where the maps are small: widths 16/32/80, as many
    # parameters (1.02M against 1.19M) for half the FLOPs per image (docs/BENCHMARKS.md, issue 12);
    # the default for 28x28 images (store.run_config.PRESET_FOR_SIZE)
    "mnist28-lean": dict(image_size=28, in_channels=1, base_channels=16, channel_mult=(1, 2, 5), num_res_blocks=1,
                         attention_resolutions=(7,), num_heads=4, groups=8),
    # DDPM's CIFAR-10 layout (the paper reports 35.7M parameters; this UNet counts 38.3M at 3 channels)
    "cifar32": dict(image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), num_heads=4, dropout=0.1, groups=32),
    # DDPM's depth at a CPU's scale: half the width, one residual block per level, attention at 8 px only;
    # the default for 32x32 images on a CPU (store.run_config.CPU_PRESET_FOR_SIZE; docs/BENCHMARKS.md)
    "cifar32-lean": dict(image_size=32, in_channels=3, base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                         attention_resolutions=(8,), num_heads=4, groups=32),
    "64": dict(image_size=64, in_channels=3, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
               attention_resolutions=(16, 8), head_dim=64, groups=32),
}


@dataclass
class UNetConfig(Config):
    """Shape of the denoising UNet. `UNetConfig.preset(name)` gives sizes that suit common data."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None        # None = in_channels (2 * in_channels to also learn variances)
    base_channels: int = 64                # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)   # channels per level = base * mult; len - 1 downsamples
    num_res_blocks: int = 2                # residual blocks per level in the encoder (decoder: +1)
    attention_resolutions: tuple[int, ...] = (8,)   # feature-map sizes that get self-attention
    num_heads: int = 4
    head_dim: int = 0                      # > 0: channels per head, overriding num_heads
    dropout: float = 0.0
    num_classes: int = 0                   # 0 = unconditional; else labels 0..num_classes-1 (+ null)
    use_scale_shift_norm: bool = True      # AdaGN time conditioning instead of plain addition
    groups: int = 32                       # GroupNorm groups
    max_period: float = 10000.0            # longest period of the sinusoidal time code
    text_conditioning: Literal["none", "cross_attention", "multiply", "both"] = "none"
    context_dim: int = 0                   # D of the text encoder (token and pooled embeddings); 0 = no text
    cross_attention_resolutions: tuple[int, ...] | None = None   # None = attention_resolutions
    transformer_depth: int = 1             # transformer blocks per cross-attention layer
    prediction_type: PredictionType = "epsilon"   # what the network outputs: eps, x0 ("sample") or v

    def validate(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("image_size", "in_channels", "out_channels", "base_channels", "groups"):
            check_range(name, getattr(self, name), lo=1)
        check_range("num_res_blocks", self.num_res_blocks, lo=0)
        check_range("num_classes", self.num_classes, lo=0)
        check_range("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self._validate_text()
        validate_layout(self)

    def _validate_text(self) -> None:
        if self.cross_attention_resolutions is None:
            self.cross_attention_resolutions = self.attention_resolutions
        self.cross_attention_resolutions = tuple(self.cross_attention_resolutions)   # JSON gives a list
        check_range("context_dim", self.context_dim, lo=0)
        check_range("transformer_depth", self.transformer_depth, lo=1)
        if self.text_conditioning != "none" and self.context_dim < 1:
            raise ConfigError(f"text_conditioning={self.text_conditioning!r} needs context_dim = the text "
                              f"encoder's embedding size (its `dim`, e.g. 384 for all-MiniLM-L6-v2); got "
                              f"context_dim={self.context_dim}.")
        if self.text_conditioning == "none" and self.context_dim:
            raise ConfigError(f"context_dim={self.context_dim} is set but text_conditioning='none'; choose "
                              "text_conditioning='cross_attention', 'multiply' or 'both', or set context_dim=0.")

    @property
    def cross_attention(self) -> bool:
        """Whether the UNet cross-attends to token embeddings."""
        return self.text_conditioning in ("cross_attention", "both")

    @property
    def multiply_text(self) -> bool:
        """Whether the pooled text embedding is multiplied into the feature maps."""
        return self.text_conditioning in ("multiply", "both")

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNetConfig":
        """A named configuration (see PRESETS), with any field overridden by keyword."""
        if name not in PRESETS:
            hint = difflib.get_close_matches(name, list(PRESETS), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown UNet preset {name!r}; choose one of {list(PRESETS)}{extra}.")
        return cls(**{**PRESETS[name], **overrides})


def validate_layout(cfg) -> None:
    """Check image size, channel, group and head divisibility of a UNet-like config."""
    if not cfg.channel_mult or min(cfg.channel_mult) < 1:
        raise ConfigError(f"channel_mult={cfg.channel_mult!r}; expected a non-empty tuple of positive ints.")
    n_down = len(cfg.channel_mult) - 1
    factor = 2 ** n_down
    if cfg.image_size % factor:
        ok = max(factor, round(cfg.image_size / factor) * factor)
        raise ConfigError(f"image_size={cfg.image_size} is not divisible by {factor} (the UNet downsamples "
                          f"{n_down} times); use a multiple of {factor}, such as {ok}.")
    resolutions = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mult))]
    cross = cross_resolutions(cfg)
    for name, rs in (("attention_resolutions", cfg.attention_resolutions), ("cross_attention_resolutions", cross)):
        for r in rs:
            if r not in resolutions:
                raise ConfigError(f"{name} contains {r}, but the feature maps have sizes "
                                  f"{resolutions}; pick from those.")
    for mult, res in zip(cfg.channel_mult, resolutions):
        ch = cfg.base_channels * mult
        if ch % cfg.groups:
            raise ConfigError(f"groups={cfg.groups} does not divide {ch} channels (base_channels="
                              f"{cfg.base_channels} * {mult}); use a divisor of {ch}, such as 8.")
        if res in cfg.attention_resolutions or res in cross or res == resolutions[-1]:
            heads_for(cfg, ch)


def cross_resolutions(cfg) -> tuple[int, ...]:
    """Feature-map sizes of the encoder and decoder levels that cross-attend to text (none if off)."""
    if getattr(cfg, "text_conditioning", "none") not in ("cross_attention", "both"):
        return ()
    return tuple(cfg.cross_attention_resolutions)


def heads_for(cfg, channels: int) -> int:
    """Number of attention heads at a level with `channels` channels."""
    if cfg.head_dim > 0:
        if channels % cfg.head_dim:
            raise ConfigError(f"head_dim={cfg.head_dim} does not divide {channels} channels; use a divisor.")
        return channels // cfg.head_dim
    if cfg.num_heads < 1 or channels % cfg.num_heads:
        raise ConfigError(f"num_heads={cfg.num_heads} does not divide {channels} channels; use a divisor.")
    return cfg.num_heads
