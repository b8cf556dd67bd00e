"""Time, class and pooled-text embeddings: the sinusoidal timestep code and the context MLPs."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.fastpath import is_capturing


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of (possibly fractional) timesteps: (B,) -> (B, dim), float32.

    freqs_i = max_period^(-i / half), i = 0..half-1;  emb = [cos(t * freqs), sin(t * freqs)]
    (Transformer positional code, as used by DDPM / improved-diffusion's `timestep_embedding`).
    An odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    # float32 even under autocast: t reaches ~1000 and bf16 would round it to a multiple of 8
    t = t.to(torch.float32)
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None] * torch.exp(exponent)[None, :]                  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)       # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def as_timestep_batch(t, batch_size: int, device: torch.device) -> torch.Tensor:
    """Timesteps as a float32 tensor of shape (B,): accepts a number, a 0-d tensor or a (B,) tensor."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch_size)
    elif t.ndim != 1 or t.shape[0] not in (1, batch_size):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or shape ({batch_size},) "
                         f"to match the batch of x.")
    elif t.shape[0] == 1:
        t = t.expand(batch_size)
    return t.to(torch.float32)


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep code followed by a two-layer MLP: (B,) -> (B, emb_dim)."""

    def __init__(self, freq_dim: int, emb_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, self.max_period))


class ClassEmbedding(nn.Module):
    """One-hot class vector (with a learned null class) through a two-layer MLP: (B,) -> (B, emb_dim).

    Index `num_classes` is the null class ("no context"), which classifier-free guidance uses as the
    unconditional branch. `normalize_labels` maps None and -1 to it.
    """

    def __init__(self, num_classes: int, emb_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(num_classes + 1, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def normalize_labels(self, class_labels, batch_size: int, device: torch.device) -> torch.Tensor:
        """Integer labels of shape (B,) in [0, num_classes]; None, -1 and num_classes mean null."""
        if class_labels is None:
            return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point():
            raise ValueError(f"class_labels has dtype {labels.dtype}; pass integer class indices "
                             f"(or a (B, {self.num_classes + 1}) float vector of class weights).")
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"class_labels has shape {tuple(labels.shape)}; expected ({batch_size},).")
        bad = (labels < -1) | (labels > self.num_classes)
        if not is_capturing(labels) and bool(bad.any()):
            raise ValueError(f"class_labels contains {labels[bad][0].item()}; expected values in "
                             f"[0, {self.num_classes - 1}], or -1 / {self.num_classes} for the null class.")
        return torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels).long()

    def forward(self, class_labels, batch_size: int, device: torch.device) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=device) if class_labels is not None else None
        if labels is not None and labels.is_floating_point() and labels.ndim == 2:
            # soft class vectors (B, num_classes + 1), e.g. to interpolate between classes
            if labels.shape != (batch_size, self.num_classes + 1):
                raise ValueError(f"class vectors have shape {tuple(labels.shape)}; expected "
                                 f"({batch_size}, {self.num_classes + 1}) (last column = null class).")
            one_hot = labels.float()
        else:
            labels = self.normalize_labels(labels, batch_size, device)
            one_hot = F.one_hot(labels, self.num_classes + 1).float()   # (B, num_classes + 1)
        return self.mlp(one_hot)


class TextEmbedding(nn.Module):
    """Pooled text embedding (B, context_dim) through a two-layer MLP: -> (B, emb_dim).

    The UNet's "multiply" text conditioning uses it as the class embedding is used: its output is
    projected per block and multiplied into the feature maps as h * (1 + c).
    """

    def __init__(self, context_dim: int, emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.mlp(text_embeds)
