"""Small layers shared by the UNet, the attention blocks and the autoencoder."""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.seeding import derive_seed


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


# --- dropout that does not depend on how the batch is split ---------------------------------------

_compiling = getattr(torch.compiler, "is_compiling", lambda: False)       # torch >= 2.3
_ROW_SEEDS: contextvars.ContextVar = contextvars.ContextVar("diffusekit_row_dropout", default=None)


class _RowSeeds:
    """The per-forward state of `row_dropout_seeds`: the step's seed, the rows' global indices, a call counter."""

    def __init__(self, seed: int, rows: list[int]):
        self.seed, self.rows, self.calls = seed, rows, 0

    def next_layer(self) -> int:
        self.calls += 1
        return self.calls


@contextlib.contextmanager
def row_dropout_seeds(seed: int, rows):
    """Inside this block every `RowDropout` draws row i's mask from (seed, layer call order, rows[i]).

    `rows` are the global batch positions of the rows this process feeds the model (e.g. rank *
    per_rank + micro-batch offset + i). A row's mask then depends only on the step and its position in
    the global batch, so one process at batch B, k torchrun ranks at B/k and gradient accumulation in
    micro-batches draw the same masks and train the same weights. Nestable; one forward per block.
    """
    token = _ROW_SEEDS.set(_RowSeeds(int(seed), [int(r) for r in rows]))
    try:
        yield
    finally:
        _ROW_SEEDS.reset(token)


class RowDropout(nn.Dropout):
    """nn.Dropout whose masks, inside `row_dropout_seeds`, are drawn per row from (seed, layer, global row).

    Outside that block (evaluation, a user's own training loop) and under torch.compile it is exactly
    nn.Dropout. Inside it, keep = u >= p with u ~ U[0, 1) from a generator seeded per row by
    loop.derive_seed, scaled by 1 / (1 - p) (inverted dropout, as nn.Dropout). Costs one small
    generator per row and layer; it has no weights, so checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile (which cannot trace the context or the per-row generators): torch's own masks
        state = None if not self.training or self.p == 0 or _compiling() else _ROW_SEEDS.get()
        if state is None:
            return super().forward(x)
        if len(state.rows) != x.shape[0]:
            raise ValueError(f"row_dropout_seeds was given {len(state.rows)} row indices for a batch of "
                             f"{x.shape[0]}: pass the global position of every row the model sees.")
        layer = state.next_layer()
        masks = []
        for row in state.rows:
            g = torch.Generator(x.device).manual_seed(derive_seed(state.seed, "row_dropout", layer, row))
            masks.append(torch.rand(x.shape[1:], generator=g, device=x.device) >= self.p)
        return x * torch.stack(masks).to(x.dtype) / (1 - self.p)
