"""A small PatchGAN discriminator: one real/fake logit per image patch, for the autoencoder's adversarial term.

PatchGAN (Isola et al. 2017, pix2pix sec. 3.2.2) classifies each N x N patch of an image as real or
generated instead of the whole image; LDM (Rombach et al. 2022, appendix G) trains its autoencoders
against one, which restores the local texture and edges that a pixel loss alone averages away.
Ours: `layers` stride-2 4x4 convolutions (channels doubling, capped at 8x), then a 3x3 convolution
and a 3x3 convolution to one logit, with GroupNorm (no batch statistics, so its output does not
depend on the batch) and LeakyReLU(0.2). x (B, C, H, W) -> logits (B, 1, H / 2^layers, W / 2^layers).
"""
from __future__ import annotations

import torch
from torch import nn

from diffusekit.nn.layers import GroupNorm


def _groups(channels: int) -> int:
    """The most GroupNorm groups, up to 8, that divide `channels`."""
    return max(g for g in range(1, 9) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """Logits (B, 1, H / 2^layers, W / 2^layers), one per overlapping patch; > 0 reads as real."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3):
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"PatchDiscriminator(channels={channels}, layers={layers}); both must be >= 1.")
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            out = channels * min(2 ** i, 8)
            # no norm on the first layer (as pix2pix): the raw pixels' statistics carry the signal
            blocks += [nn.Conv2d(ch, out, 4, stride=2, padding=1), GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            ch = out
        blocks += [nn.Conv2d(ch, ch, 3, padding=1), GroupNorm(_groups(ch), ch), nn.LeakyReLU(0.2),
                   nn.Conv2d(ch, 1, 3, padding=1)]
        self.layers = layers
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = 2 ** self.layers
        if h % f or w % f:
            raise ValueError(f"images of {h}x{w} do not halve {self.layers} times; use sides divisible by {f} "
                             f"or fewer discriminator layers.")
        return self.net(x)
