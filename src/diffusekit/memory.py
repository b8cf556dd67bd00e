"""Memory checked before allocating: what a device has free, and what a request will need.

A request that cannot fit (a million images, a 1024x1024 data set, a batch the GPU cannot hold)
is refused before anything is allocated, with the estimate, what is free and the fix, instead of
an allocation the operating system kills or an out-of-memory traceback half way through.

The estimates are rough on purpose (within a factor of about 1.5 of the measured peak for the
UNet presets); a request is refused only when even the estimate exceeds what is free.
"""
from __future__ import annotations

import os

import torch

from .config import ConfigError

FLOAT32 = 4


class MemoryRequestError(ConfigError):
    """A request that would not fit in memory; the message gives the estimate, what is free and the fix."""


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 25.6e9 -> '23.8 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Bytes that can be allocated now on `device` (None where it cannot be told, e.g. Apple MPS).

    CPU: MemAvailable of /proc/meminfo (free plus reclaimable cache), else the free pages;
    CUDA: the free memory the driver reports for that device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(what: str, needed: int, fix: str, device: str | torch.device = "cpu") -> None:
    """Raise MemoryRequestError if `needed` bytes exceed what `device` has free; says both numbers and the fix."""
    free = available_bytes(device)
    if free is not None and needed > free:
        where = "this machine" if torch.device(device).type == "cpu" else str(device)
        raise MemoryRequestError(f"{what} needs about {format_bytes(needed)} but {where} has "
                                 f"{format_bytes(free)} free; {fix}.")


def unet_forward_bytes(cfg, batch: int) -> int:
    """Rough peak bytes of one no-grad float32 forward pass of a UNet of config `cfg` on `batch` images.

    The skip tensors the decoder keeps (num_res_blocks + 1 per level), about a dozen working tensors
    at the widest level, and the attention maps (heads x HW x HW, twice for the softmax). 0 for a
    config without the UNet fields (a diffusers or user model): only the images are then counted.
    """
    try:
        size, base, mults = int(cfg.image_size), int(cfg.base_channels), tuple(cfg.channel_mult)
        blocks, attention = int(cfg.num_res_blocks), set(cfg.attention_resolutions or ())
        head_dim, num_heads = int(getattr(cfg, "head_dim", 0) or 0), int(cfg.num_heads)
    except (AttributeError, TypeError, ValueError):
        return 0
    skips = widest = attn = 0
    for level, mult in enumerate(mults):
        res, channels = size // 2 ** level, base * mult
        values = channels * res * res
        skips, widest = skips + (blocks + 1) * values, max(widest, values)
        if res in attention:
            heads = channels // head_dim if head_dim else num_heads
            attn = max(attn, 2 * heads * (res * res) ** 2)
    return batch * (skips + 12 * widest + attn) * FLOAT32


def check_sampling(n: int, batch_size: int, *, image_shape, device: str | torch.device = "cpu", latent_shape=None,
                   model_config=None, guided: bool = False) -> None:
    """Refuse a sampling request that cannot fit, before its noise is drawn.

    Host memory holds the starting noise of all n images and the results (a list and their
    concatenation); the device holds one batch in the model (twice the batch under classifier-free
    guidance, which calls the model on [cond; uncond]).
    """
    latent_shape = tuple(latent_shape or image_shape)
    per_noise, per_image = FLOAT32 * _numel(latent_shape), FLOAT32 * _numel(image_shape)
    host = n * per_noise + 2 * n * per_image
    b = min(n, batch_size) * (2 if guided else 1)
    model_batch = unet_forward_bytes(model_config, b) + 8 * b * per_noise     # + the sampler's few tensors
    device = torch.device(device)
    shape = "x".join(str(v) for v in image_shape)
    fewer = f"ask for fewer images (--n {n} now), or sample them in several runs with different seeds"
    smaller = f"lower --batch-size (now {batch_size})"
    if device.type == "cpu":
        # one budget: suggest the fix for the larger of the two parts
        check_fits(f"sampling {n} images of {shape} ({format_bytes(host)} for the noise and results, "
                   f"{format_bytes(model_batch)} for a batch of {b} in the model)", host + model_batch,
                   smaller if model_batch > host else fewer, "cpu")
        return
    check_fits(f"sampling {n} images of {shape} (the noise and results)", host, fewer, "cpu")
    check_fits(f"a batch of {b} images of {shape} in the model", model_batch, smaller, device)


def check_images_fit(count: int, channels: int, size: int, copies: int, what: str, fix: str) -> None:
    """Refuse to hold `copies` float32 copies of `count` images of channels x size x size in host memory."""
    needed = copies * count * channels * size * size * FLOAT32
    check_fits(f"{what} ({count} images of {channels}x{size}x{size} as float32)", needed, fix, "cpu")


def _numel(shape) -> int:
    out = 1
    for v in shape:
        out *= int(v)
    return out
