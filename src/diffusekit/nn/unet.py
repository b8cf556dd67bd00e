"""The denoising UNet: residual blocks with time, class and text conditioning, low-resolution attention.

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
    can never zero out a feature map early in training (plain h * c can, and is unstable);
  * text (`text_conditioning`): "cross_attention" puts spatial transformers (self-attention,
    cross-attention to the token embeddings with their padding mask, GEGLU feed-forward; LDM sec. 3.3)
    at `cross_attention_resolutions` and in the middle block, where they replace the plain
    self-attention; "multiply" projects the pooled text embedding by an MLP and multiplies it in as the
    class embedding is (added to it when both are on); "both" does both. Every text path starts at
    zero (proj_out, ctx_proj), so a fresh text UNet computes what the text-free one does.
With text_conditioning="none" the parameters (names and shapes) and outputs are those of the
text-free UNet of earlier versions, so its checkpoints keep loading.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.fastpath import is_capturing
from diffusekit.nn.attention import AttentionBlock, SpatialTransformer
from diffusekit.nn.embeddings import ClassEmbedding, TextEmbedding, TimestepEmbedding, as_timestep_batch
from diffusekit.nn.layers import Downsample, GroupNorm, RowDropout, Upsample, zero_module
from diffusekit.nn.unet_config import PRESETS, UNetConfig, cross_resolutions, heads_for, validate_layout  # noqa: F401

def _attention(cfg, channels: int, res: int, middle: bool = False) -> nn.Module | None:
    """The attention layer at a level: a spatial transformer where text is cross-attended, else self-attention."""
    heads = heads_for(cfg, channels)
    if cross_resolutions(cfg) and (middle or res in cross_resolutions(cfg)):
        return SpatialTransformer(channels, heads, cfg.context_dim, cfg.groups, cfg.transformer_depth)
    if middle or res in cfg.attention_resolutions:
        return AttentionBlock(channels, heads, cfg.groups)
    return None


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
        self.dropout = RowDropout(dropout)         # masks by global row in training (training.inputs)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def project(self, temb: torch.Tensor, cemb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This block's conditioning factors: emb (B, C or 2C, 1, 1) and ctx = 1 + c (B, C, 1, 1) or None."""
        emb = self.emb_proj(F.silu(temb))[:, :, None, None]
        # context UNet: h * (1 + c_emb); zero-initialised, so it starts as the unconditioned block
        ctx = None
        if self.ctx_proj is not None and cemb is not None:
            ctx = 1 + self.ctx_proj(F.silu(cemb))[:, :, None, None]
        return emb, ctx

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor | None = None,
                projected: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """`projected`: this block's `project(temb, cemb)` computed ahead (see `project_all`)."""
        h = self.conv1(F.silu(self.norm1(x)))
        emb, ctx = self.project(temb, cemb) if projected is None else projected
        if self.use_scale_shift_norm:
            # AdaGN: norm(h) * (1 + scale) + shift   (ADM, Dhariwal & Nichol 2021, sec. 3), times ctx:
            # (norm(h) * (1 + scale) + shift) * ctx, folded on the (B, C, 1, 1) factors into the norm's affine
            scale, shift = emb.chunk(2, dim=1)
            scale = 1 + scale
            if ctx is not None:
                scale, shift = scale * ctx, shift * ctx
            h = self.norm2.modulated(h, scale, shift)
        else:
            h = self.norm2(h + emb)                                   # DDPM: h + time embedding
            if ctx is not None:
                h = h * ctx
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class EmbedSequential(nn.Sequential):
    """Layers where residual blocks also receive the time and context embeddings, transformers the text."""

    def forward(self, x, temb, cemb=None, context=None, context_mask=None, projected=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, temb, cemb, None if projected is None else projected[layer])
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def _res_block(cfg, in_ch, out_ch, emb_dim, ctx_dim):
    return ResBlock(in_ch, out_ch, emb_dim, ctx_dim, groups=cfg.groups, dropout=cfg.dropout,
                    use_scale_shift_norm=cfg.use_scale_shift_norm)


def project_all(blocks: list[ResBlock], temb: torch.Tensor, cemb: torch.Tensor | None = None) -> dict:
    """Every block's `project(temb, cemb)` from one matmul per embedding: {block: (emb, ctx)}.

    silu(temb) [W_1; ...; W_n]^T + [b_1; ...; b_n] holds the n per-block projections side by side, so one
    (B, E) x (E, sum C_i) product replaces n small ones (and n silus); the split gives back each block's part.
    """
    def stacked(linears, e):
        weight = torch.cat([lin.weight for lin in linears])            # (sum C_i, E)
        bias = torch.cat([lin.bias for lin in linears])
        return F.linear(F.silu(e), weight, bias).split([lin.out_features for lin in linears], dim=1)

    embs = stacked([b.emb_proj for b in blocks], temb)
    ctxs = [None] * len(blocks)
    if cemb is not None and blocks[0].ctx_proj is not None:     # a UNet's blocks all have one, or none does
        ctxs = [1 + c[:, :, None, None] for c in stacked([b.ctx_proj for b in blocks], cemb)]
    return {b: (e[:, :, None, None], c) for b, e, c in zip(blocks, embs, ctxs)}


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
                attn = _attention(cfg, ch, res)
                if attn is not None:
                    layers.append(attn)
                self.down.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                res //= 2
        self.middle = EmbedSequential(_res_block(cfg, ch, ch, emb_dim, ctx_dim),
                                      _attention(cfg, ch, res, middle=True),
                                      _res_block(cfg, ch, ch, emb_dim, ctx_dim))
        self.out_channels = ch

    def forward(self, x, temb, cemb=None, context=None, context_mask=None, projected=None):
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, temb, cemb, context, context_mask, projected)
            skips.append(h)
        return self.middle(h, temb, cemb, context, context_mask, projected), skips


TEXT_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "text_embeds")


def check_text_inputs(cfg, batch: int, x: torch.Tensor, encoder_hidden_states=None, encoder_attention_mask=None,
                      text_embeds=None):
    """The text keywords a UNet config uses, checked and expanded to the batch: (context, mask, pooled).

    Each is None where the mode does not use it. Raises ValueError naming the fix for a missing,
    misshaped or unexpected keyword, or a mask row that hides every token.
    """
    values = dict(zip(TEXT_KEYS, (encoder_hidden_states, encoder_attention_mask, text_embeds)))
    mode, D = cfg.text_conditioning, cfg.context_dim
    if mode == "none":
        given = [k for k, v in values.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]} was given but this UNet has no text conditioning (text_conditioning="
                             "'none'); drop the prompt, or build the UNet with text_conditioning='cross_attention' "
                             "(or 'multiply', 'both') and context_dim = the text encoder's dim.")
        return None, None, None
    context = mask = pooled = None
    if cfg.cross_attention:
        context = _text_tensor(values, "encoder_hidden_states", batch, (None, D), mode)
        if encoder_attention_mask is not None:
            mask = torch.as_tensor(encoder_attention_mask, device=context.device)
            if mask.ndim != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != context.shape[1]:
                raise ValueError(f"encoder_attention_mask has shape {tuple(mask.shape)}; expected ({batch}, "
                                 f"{context.shape[1]}) to match encoder_hidden_states (True = token, False = padding).")
            mask = (mask if mask.dtype == torch.bool else mask != 0).expand(batch, -1)
            empty = (~mask.any(dim=1)).nonzero() if not is_capturing(mask) else ()
            if len(empty):
                raise ValueError(f"encoder_attention_mask row {empty[0].item()} masks every token, so cross-attention "
                                 "has nothing to attend to; keep at least one token (the text encoders keep a start "
                                 "token even for the empty prompt).")
        context = context.to(x.dtype)
    if cfg.multiply_text:
        pooled = _text_tensor(values, "text_embeds", batch, (D,), mode).to(x.dtype)
    return context, mask, pooled


def _text_tensor(values: dict, name: str, batch: int, tail: tuple, mode: str) -> torch.Tensor:
    """values[name] as a tensor (batch, *tail) (None in tail = any size); a batch of 1 is expanded."""
    v = values[name]
    if v is None:
        raise ValueError(f"this UNet is text-conditioned (text_conditioning={mode!r}) but {name} is missing; pass "
                         "the text encoder's output, model(x, t, **text_encoder.encode(prompts)) (the empty prompt "
                         "\"\" gives the unconditional encoding).")
    v = torch.as_tensor(v)
    ok = v.ndim == 1 + len(tail) and v.shape[0] in (1, batch) and all(
        want is None or have == want for have, want in zip(v.shape[1:], tail))
    if not ok:
        want = ", ".join("L" if d is None else str(d) for d in tail)
        raise ValueError(f"{name} has shape {tuple(v.shape)}; expected ({batch}, {want}) (or a batch of 1). "
                         f"The UNet was built with context_dim={tail[-1]}: use a text encoder whose dim is "
                         f"{tail[-1]}, or rebuild the UNet with context_dim = the encoder's dim.")
    return v.expand(batch, *v.shape[1:])


class UNet(nn.Module):
    """Denoising UNet: `forward(x, t, class_labels=None, **text)` -> a tensor shaped like x with out_channels.

    t: timesteps in training-timestep units, a (B,) float or int tensor or a scalar (fractional
    values allowed). class_labels: (B,) ints; None, -1 or num_classes mean the null class.
    Text (what `TextEncoder.encode(prompts)` returns; batch 1 serves the whole batch):
    encoder_hidden_states (B, L, context_dim) and encoder_attention_mask (B, L) bool (True = token,
    None = all tokens) for cross-attention; text_embeds (B, context_dim) for "multiply". Keywords the
    configured mode does not use are ignored; the empty prompt's encoding is the unconditional one.
    Works in fp32 and under `torch.autocast(..., dtype=torch.bfloat16)`, in either memory format.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = 4 * cfg.base_channels
        self.time_embed = TimestepEmbedding(cfg.base_channels, emb_dim, cfg.max_period)
        self.class_embed = ClassEmbedding(cfg.num_classes, emb_dim) if cfg.num_classes > 0 else None
        if cfg.multiply_text:
            self.text_embed = TextEmbedding(cfg.context_dim, emb_dim)
        else:
            self.text_embed = None
        ctx_dim = emb_dim if cfg.num_classes > 0 or cfg.multiply_text else None
        self.encoder = Encoder(cfg, cfg.in_channels, emb_dim, ctx_dim)
        skips = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        res = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [_res_block(cfg, ch + skips.pop(), cfg.base_channels * mult, emb_dim, ctx_dim)]
                ch = cfg.base_channels * mult
                attn = _attention(cfg, ch, res)
                if attn is not None:
                    layers.append(attn)
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(EmbedSequential(*layers))
        self.out_norm = GroupNorm(cfg.groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        # the residual blocks in call order (a plain list: the modules are registered above)
        self.res_blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        self.batch_projections = True      # False: each block projects its own embeddings (same result)

    def forward(self, x: torch.Tensor, t, class_labels=None, encoder_hidden_states=None,
                encoder_attention_mask=None, text_embeds=None) -> torch.Tensor:
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
        context, context_mask, pooled = check_text_inputs(cfg, B, x, encoder_hidden_states,
                                                          encoder_attention_mask, text_embeds)
        if pooled is not None:
            temb_text = self.text_embed(pooled)                        # (B, 4 * base)
            cemb = temb_text if cemb is None else cemb + temb_text
        w = self.encoder.middle[0].conv1.weight                       # (C, C, 3, 3), C > 1
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)      # match the weights' memory format
        # one matmul for all blocks' projections in eager mode; inductor does better with the per-block ones
        batch = self.batch_projections and not torch.compiler.is_compiling()
        projected = project_all(self.res_blocks, temb, cemb) if batch else None
        h, skips = self.encoder(x, temb, cemb, context, context_mask, projected)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), temb, cemb, context, context_mask, projected)
        return self.out_conv(F.silu(self.out_norm(h)))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with requires_grad if trainable_only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
