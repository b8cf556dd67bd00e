"""Small layers shared by the UNet, the attention blocks and the autoencoder."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


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

    def modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """norm(x) * scale + shift with a per-sample, per-channel scale and shift (B, C, 1, 1), in one kernel.

        With n the normalised x: (n * gamma + beta) * scale + shift = n * (gamma * scale) + (beta * scale + shift),
        a (B, C) affine. A GroupNorm of x viewed as (1, B * C, H, W) with B * groups groups normalises the
        same groups (each sample's stay apart) and takes that affine as its weight and bias, so one
        group_norm pass replaces the norm plus a broadcast addcmul (~5x slower in bf16 on CPU). Under
        torch.compile the plain form is kept: inductor fuses it itself, and faster than the folded one.
        """
        if torch.compiler.is_compiling():
            return torch.addcmul(shift, self(x), scale)
        B, C = x.shape[:2]
        if x.device.type == "cpu" and not x.is_contiguous():
            x = x.contiguous()
        scale, shift = scale.reshape(B, C), shift.reshape(B, C)
        weight = scale if self.weight is None else self.weight * scale
        bias = shift if self.bias is None else self.bias * scale + shift
        out = F.group_norm(x.reshape(1, B * C, *x.shape[2:]), B * self.num_groups, weight.reshape(-1),
                           bias.reshape(-1), self.eps)
        return out.reshape(x.shape)


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
