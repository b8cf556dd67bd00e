"""UNet layouts for any image size from 8 to 256 px, and a one-screen table of a layout.

`derive_unet_config(size, channels)` replaces a fixed list of presets. The rules, in the spirit
of DDPM's and ADM's models (DDPM CIFAR-10: 32 -> 4 px, mult (1, 2, 2, 2); ADM 64: 64 -> 8 px,
mult (1, 2, 3, 4); ADM 256: lowest 8 px, narrow high-resolution levels):
  * depth: halve while the side is even and the half is at least 4 px (images under 64 px) or
    8 px (64 px and up); the lowest feature map must end at most 8 px (under 64) or 16 px (from 64),
    so sizes such as 9, 18 or 30 (whose halves turn odd too early) are refused with the nearest
    sizes that work;
  * widths: base 32 channels below 32 px, 64 below 64 px, 128 from 64 px; multipliers 1 then 2
    at every lower level below 64 px; from 64 px, 1 at each level above 64 px, then 1, 2, 3, 4, 4...;
  * attention at every level of 8 to 16 px (the middle block always attends);
  * residual blocks per level: 1 below 32 px, 2 from 32 px; dropout 0.1 from 32 px (DDPM);
  * GroupNorm groups: min(32, base / 4), halved until it divides every level's width; heads: 4,
    or 64 channels per head from 64 px (ADM).
"""
from __future__ import annotations

import torch

from diffusekit.config import ConfigError
from diffusekit.nn.unet import UNet, UNetConfig

MIN_SIZE, MAX_SIZE = 8, 256


def _levels(size: int) -> list[int] | None:
    """Feature-map sides of the derived layout, or None if `size` has none."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        return None
    min_low, max_low = (4, 8) if size < 64 else (8, 16)
    sides = [size]
    while sides[-1] % 2 == 0 and sides[-1] // 2 >= min_low:
        sides.append(sides[-1] // 2)
    return sides if len(sides) > 1 and sides[-1] <= max_low else None


def valid_sizes() -> list[int]:
    """Every image size derive_unet_config accepts."""
    return [s for s in range(MIN_SIZE, MAX_SIZE + 1) if _levels(s) is not None]


def _nearest_sizes(size: int) -> list[int]:
    sizes = valid_sizes()
    best = min(abs(s - size) for s in sizes)
    return [s for s in sizes if abs(s - size) == best]


def _size_error(size: int) -> str:
    near = " or ".join(str(s) for s in _nearest_sizes(size))
    if size < MIN_SIZE or size > MAX_SIZE:
        why = f"sizes {MIN_SIZE} to {MAX_SIZE} are supported"
    else:
        low, limit = size, 8 if size < 64 else 16
        while low % 2 == 0 and low // 2 >= limit // 2:
            low //= 2
        why = (f"it halves evenly only down to {low} px, and the lowest feature map must be at most {limit} px "
               f"for this size")
    return (f"image_size={size} has no derived UNet layout: {why}; use {near}, resizing and cropping the images "
            "to it (on the command line --image-size N, with --crop center or random).")


def _channel_mult(sides: list[int]) -> tuple[int, ...]:
    if sides[0] < 64:
        return (1,) + (2,) * (len(sides) - 1)
    high = sum(1 for s in sides if s > 64)              # narrow levels above 64 px (ADM 256)
    ramp = [min(i + 1, 4) for i in range(len(sides) - high)]
    return tuple([1] * high + ramp)


def _groups(base: int, mult: tuple[int, ...]) -> int:
    groups = max(1, min(32, base // 4))
    while any((base * m) % groups for m in mult):
        groups //= 2
    return groups


def derive_unet_config(image_size: int, in_channels: int, num_classes: int = 0, **overrides) -> UNetConfig:
    """A UNetConfig suited to square images of side image_size (8..256), any field overridden by keyword.

    Raises ConfigError naming the nearest sizes that work for a size outside 8..256 or one whose
    halvings turn odd before reaching a small enough feature map.
    """
    sides = _levels(int(image_size))
    if sides is None:
        raise ConfigError(_size_error(int(image_size)))
    size = sides[0]
    base = overrides.get("base_channels", 32 if size < 32 else 64 if size < 64 else 128)
    mult = tuple(overrides.get("channel_mult", _channel_mult(sides)))
    derived = dict(
        image_size=size, in_channels=in_channels, num_classes=num_classes, base_channels=base,
        channel_mult=mult, num_res_blocks=1 if size < 32 else 2,
        attention_resolutions=tuple(s for s in sides[:len(mult)] if 8 <= s <= 16),
        num_heads=4, head_dim=64 if size >= 64 and base % 64 == 0 else 0,
        dropout=0.1 if size >= 32 else 0.0, groups=_groups(base, mult),
    )
    return UNetConfig(**{**derived, **overrides})


def describe_layout(cfg: UNetConfig) -> str:
    """A one-screen table of a UNet layout: per level its side, channels, blocks and attention."""
    sides = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mult))]
    cross = set(cfg.cross_attention_resolutions) if cfg.cross_attention else set()
    with torch.device("meta"):                          # count parameters without allocating them
        n_params = UNet(cfg).num_parameters()

    def attention(side: int, middle: bool = False) -> str:
        if cross and (middle or side in cross):
            return "self + cross (text)"
        return "self" if middle or side in cfg.attention_resolutions else "-"

    cond = [f"{cfg.num_classes} classes"] if cfg.num_classes else []
    if cfg.text_conditioning != "none":
        cond.append(f"text {cfg.text_conditioning}, context_dim {cfg.context_dim}")
    lines = [f"UNet {cfg.image_size}x{cfg.image_size}x{cfg.in_channels} -> {cfg.out_channels} channels, "
             f"{n_params / 1e6:.2f}M parameters, {', '.join(cond) or 'unconditional'}",
             f"{'level':<7}{'resolution':<12}{'channels':>9}{'res blocks':>12}  attention"]
    for level, (side, mult) in enumerate(zip(sides, cfg.channel_mult)):
        lines.append(f"{level:<7}{f'{side}x{side}':<12}{cfg.base_channels * mult:>9}{cfg.num_res_blocks:>12}  "
                     f"{attention(side)}")
    low = sides[-1]
    lines.append(f"{'middle':<7}{f'{low}x{low}':<12}{cfg.base_channels * cfg.channel_mult[-1]:>9}{2:>12}  "
                 f"{attention(low, middle=True)}")
    lines.append(f"groups {cfg.groups}, heads {'%d ch/head' % cfg.head_dim if cfg.head_dim else cfg.num_heads}, "
                 f"dropout {cfg.dropout}; decoder levels mirror these with {cfg.num_res_blocks + 1} blocks each")
    return "\n".join(lines)
