"""The denoising UNet: residual blocks with time and class embeddings, low-resolution self-attention.

Layout follows DDPM / improved-diffusion (ADM): an encoder of residual blocks with stride-2
downsampling, a middle block (res, attention, res), and a decoder that concatenates the
encoder's activations (skip connections). Every residual branch and the final conv start at
zero, so a fresh UNet outputs exactly 0 and each block starts as the identity.

Conditioning:
  * time: sinusoidal code -> MLP -> per-block linear, ADDED to the feature maps
    (or, with use_scale_shift_norm, AdaGN: norm(h) * (1 + scale) + shift, ADM sec. 3);
  * class ("context UNet"): one-hot class vector (index num_classes = learned null class) -> MLP ->
    per-block linear, MULTIPLIED into the feature maps as h * (1 + c). The "1 +" form with a
    zero-initialised projection starts every block as the unconditioned one, so conditioning
    can never zero out a feature map early in training (plain h * c can, and is unstable).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.nn.embeddings import ClassEmbedding, TimestepEmbedding, as_timestep_batch

PRESETS: dict[str, dict] = {
    # 8x8 sklearn digits, 1 channel: fast on a 2-core CPU
    "tiny8": dict(image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=4, groups=8),
    "small16": dict(image_size=16, in_channels=3, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                    attention_resolutions=(8,), num_heads=4, groups=16),
    # MNIST / Fashion-MNIST: 28 -> 14 -> 7
    "mnist28": dict(image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(7,), num_heads=4, groups=8),
    # DDPM's CIFAR-10 model (35.7M parameters)
    "cifar32": dict(image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), num_heads=4, dropout=0.1, groups=32),
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

    def validate(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("image_size", "in_channels", "out_channels", "base_channels", "groups"):
            check_range(name, getattr(self, name), lo=1)
        check_range("num_res_blocks", self.num_res_blocks, lo=0)
        check_range("num_classes", self.num_classes, lo=0)
        check_range("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        validate_layout(self)

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
    for r in cfg.attention_resolutions:
        if r not in resolutions:
            raise ConfigError(f"attention_resolutions contains {r}, but the feature maps have sizes "
                              f"{resolutions}; pick from those.")
    for mult, res in zip(cfg.channel_mult, resolutions):
        ch = cfg.base_channels * mult
        if ch % cfg.groups:
            raise ConfigError(f"groups={cfg.groups} does not divide {ch} channels (base_channels="
                              f"{cfg.base_channels} * {mult}); use a divisor of {ch}, such as 8.")
        if res in cfg.attention_resolutions or res == resolutions[-1]:
            heads_for(cfg, ch)


def heads_for(cfg, channels: int) -> int:
    """Number of attention heads at a level with `channels` channels."""
    if cfg.head_dim > 0:
        if channels % cfg.head_dim:
            raise ConfigError(f"head_dim={cfg.head_dim} does not divide {channels} channels; use a divisor.")
        return channels // cfg.head_dim
    if cfg.num_heads < 1 or channels % cfg.num_heads:
        raise ConfigError(f"num_heads={cfg.num_heads} does not divide {channels} channels; use a divisor.")
    return cfg.num_heads


def zero_module(m: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity (ADM)."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises a contiguous (NCHW) copy of a channels_last input on CPU.

    PyTorch's CPU group_norm kernel is several times slower on channels_last tensors (about 10x
    in bf16 at 64x32x28x28, torch 2.13) than a memory-format copy plus the NCHW kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not x.is_contiguous():
            x = x.contiguous()
        return super().forward(x)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, time embedding (add or scale-shift), class scale, GN-SiLU-dropout-conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, ctx_dim: int | None, *, groups: int,
                 dropout: float, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if use_scale_shift_norm else 1))
        self.ctx_proj = zero_module(nn.Linear(ctx_dim, out_ch)) if ctx_dim else None
        self.norm2 = GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.emb_proj(F.silu(temb))[:, :, None, None]          # (B, C or 2C, 1, 1)
        # context UNet: h * (1 + c_emb); zero-initialised, so it starts as the unconditioned block
        ctx = None
        if self.ctx_proj is not None and cemb is not None:
            ctx = 1 + self.ctx_proj(F.silu(cemb))[:, :, None, None]   # (B, C, 1, 1)
        if self.use_scale_shift_norm:
            # AdaGN: norm(h) * (1 + scale) + shift   (ADM, Dhariwal & Nichol 2021, sec. 3), times ctx:
            # (norm(h) * (1 + scale) + shift) * ctx, folded on the (B, C, 1, 1) factors into one addcmul
            scale, shift = emb.chunk(2, dim=1)
            scale = 1 + scale
            if ctx is not None:
                scale, shift = scale * ctx, shift * ctx
            h = torch.addcmul(shift, self.norm2(h), scale)
        else:
            h = self.norm2(h + emb)                                   # DDPM: h + time embedding
            if ctx is not None:
                h = h * ctx
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a fused qkv projection and a residual."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C)
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        # (B, HW, 3C) -> 3 x (B, heads, HW, C / heads)
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d)) v.  On CPU in bf16 the flash kernel is ~5x slower than the math
        # one at these short sequences (<= 256 tokens), so pick the math backend there.
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, H * W, C))
        return x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)       # back to (B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A sequence of layers where residual blocks also receive the time and class embeddings."""

    def forward(self, x, temb, cemb=None):
        for layer in self:
            x = layer(x, temb, cemb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _res_block(cfg, in_ch, out_ch, emb_dim, ctx_dim):
    return ResBlock(in_ch, out_ch, emb_dim, ctx_dim, groups=cfg.groups, dropout=cfg.dropout,
                    use_scale_shift_norm=cfg.use_scale_shift_norm)


class Encoder(nn.Module):
    """The UNet's down path and middle block; returns the bottleneck and the skip activations.

    Shared by `UNet` and the noise-aware classifier. `cfg` is any config with the UNetConfig
    layout fields (image_size, base_channels, channel_mult, num_res_blocks, ...).
    """

    def __init__(self, cfg, in_channels: int, emb_dim: int, ctx_dim: int | None):
        super().__init__()
        ch = cfg.base_channels * cfg.channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.skip_channels = [ch]
        self.down = nn.ModuleList()
        res = cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [_res_block(cfg, ch, cfg.base_channels * mult, emb_dim, ctx_dim)]
                ch = cfg.base_channels * mult
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads_for(cfg, ch), cfg.groups))
                self.down.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                res //= 2
        self.middle = EmbedSequential(_res_block(cfg, ch, ch, emb_dim, ctx_dim),
                                      AttentionBlock(ch, heads_for(cfg, ch), cfg.groups),
                                      _res_block(cfg, ch, ch, emb_dim, ctx_dim))
        self.out_channels = ch

    def forward(self, x, temb, cemb=None):
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, temb, cemb)
            skips.append(h)
        return self.middle(h, temb, cemb), skips


class UNet(nn.Module):
    """Denoising UNet: `forward(x, t, class_labels=None)` -> a tensor shaped like x with out_channels.

    t: timesteps in training-timestep units, a (B,) float or int tensor or a scalar (fractional
    values allowed). class_labels: (B,) ints; None, -1 or num_classes mean the null class.
    Works in fp32 and under `torch.autocast(..., dtype=torch.bfloat16)`, in either memory format.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = 4 * cfg.base_channels
        self.time_embed = TimestepEmbedding(cfg.base_channels, emb_dim, cfg.max_period)
        self.class_embed = ClassEmbedding(cfg.num_classes, emb_dim) if cfg.num_classes > 0 else None
        ctx_dim = emb_dim if cfg.num_classes > 0 else None
        self.encoder = Encoder(cfg, cfg.in_channels, emb_dim, ctx_dim)
        skips = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        res = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [_res_block(cfg, ch + skips.pop(), cfg.base_channels * mult, emb_dim, ctx_dim)]
                ch = cfg.base_channels * mult
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads_for(cfg, ch), cfg.groups))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(EmbedSequential(*layers))
        self.out_norm = GroupNorm(cfg.groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, H, W).")
        B = x.shape[0]
        temb = self.time_embed(as_timestep_batch(t, B, x.device))     # (B, 4 * base)
        if self.class_embed is not None:
            cemb = self.class_embed(class_labels, B, x.device)         # (B, 4 * base)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this UNet is unconditional (num_classes=0); "
                             "build it with num_classes > 0 or drop class_labels.")
        else:
            cemb = None
        w = self.encoder.middle[0].conv1.weight                       # (C, C, 3, 3), C > 1
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)      # match the weights' memory format
        h, skips = self.encoder(x, temb, cemb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), temb, cemb)
        return self.out_conv(F.silu(self.out_norm(h)))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with requires_grad if trainable_only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
