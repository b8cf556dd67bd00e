"""Attention: spatial self-attention, multi-head (cross-)attention with a key mask, the transformer
block, and the spatial transformer that brings text tokens into the UNet's feature maps.

The spatial transformer follows Latent Diffusion (Rombach et al. 2022, sec. 3.3 and appendix):
GroupNorm, a projection in, transformer blocks over the H*W positions (self-attention,
cross-attention to the token embeddings, feed-forward), a zero-initialised projection out and a
residual, so a fresh block is exactly the identity and training starts from the text-free UNet.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusekit.nn.layers import GroupNorm, zero_module


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_mask: torch.Tensor | None = None, upcast_on_cpu: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors; key_mask (B, L) bool, True = attend.

    On CPU in bf16 / fp16, q, k and v go through the fp32 kernel and the result is cast back: the
    CPU flash kernel in bf16 is ~9x slower in training at these short sequences (<= 256 tokens),
    and the math backend, which computes in fp32 internally anyway, is ~2x slower than fp32 flash
    (64 x 4 x 49 x 16, torch 2.13; bench in docs/BENCHMARKS.md). Same result to fp32 rounding.
    `upcast_on_cpu=False` keeps the earlier path (math backend in the input dtype) for comparison;
    under torch.compile it is taken too (inductor's own attention kernels are faster than the upcast).
    """
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]   # (B, L) -> (B, 1, 1, L)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        if upcast_on_cpu and not torch.compiler.is_compiling():
            with torch.autocast("cpu", enabled=False):        # autocast would cast them back to bf16
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
            return out.to(q.dtype)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


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
        out = scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, H * W, C))
        return x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)       # back to (B, C, H, W)


class Attention(nn.Module):
    """Multi-head attention of queries (B, N, dim) to a context (B, L, context_dim), or to themselves.

    `mask` (B, L) bool marks the context positions that may be attended to (False = padding);
    every row needs at least one True, or its softmax has nothing to normalise.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide dim={dim}; use a divisor of {dim}.")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, D = x.shape
        L, h = context.shape[1], self.heads
        # (B, N, D) -> (B, heads, N, D / heads); keys and values likewise with L positions
        q = self.to_q(x).reshape(B, N, h, D // h).transpose(1, 2)
        k = self.to_k(context).reshape(B, L, h, D // h).transpose(1, 2)
        v = self.to_v(context).reshape(B, L, h, D // h).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, mask)
        return self.to_out(out.transpose(1, 2).reshape(B, N, D))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020, as in LDM): [a, gate] = x W1;  out = (a * gelu(gate)) W2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to a context (if context_dim), feed-forward.

    Used over image positions by SpatialTransformer and over tokens by the learned text encoder.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, ff_mult: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.cross_attn = Attention(dim, heads, context_dim) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                self_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), mask=self_mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Cross-attention from feature maps (B, C, H, W) to token embeddings (B, L, context_dim) (LDM sec. 3.3).

    x + proj_out(blocks(proj_in(norm(x)))) over the H*W positions; proj_out starts at zero, so a
    fresh block returns x exactly, whatever the text.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int = 1):
        super().__init__()
        self.norm = GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C)
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))
        for block in self.blocks:
            h = block(h, context, context_mask)
        h = self.proj_out(h)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)         # back to (B, C, H, W)
