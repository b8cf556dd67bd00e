"""diffusekit's UNet as a diffusers UNet2DModel: which layouts map, the config, the weight names.

Both follow DDPM / ADM: conv_in, per level `num_res_blocks` residual blocks (each followed by
self-attention at the chosen resolutions) and a stride-2 conv downsampler, a middle block
(res, attention, res), a decoder with one more block per level fed by the skip connections,
nearest-neighbour upsampling with a conv, GroupNorm-SiLU-conv out. Block for block:

  ours                                        UNet2DModel
  time_embed.mlp.{0,2}                        time_embedding.linear_{1,2}   (flip_sin_to_cos=True, freq_shift=0)
  encoder.input_conv                          conv_in
  encoder.down[k] ResBlock / AttentionBlock   down_blocks.L.resnets.i / .attentions.i
  encoder.down[k] Downsample.conv             down_blocks.L.downsamplers.0.conv
  encoder.middle.{0,1,2}                      mid_block.resnets.0, .attentions.0, .resnets.1
  up[k] ResBlock / AttentionBlock / Upsample  up_blocks.L'.resnets.i / .attentions.i / .upsamplers.0
  out_norm, out_conv                          conv_norm_out, conv_out
  ResBlock norm1 conv1 emb_proj norm2 conv2 skip   norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
  AttentionBlock norm, qkv (fused), proj      group_norm, to_q / to_k / to_v (qkv split in three), to_out.0

AdaGN (use_scale_shift_norm) is resnet_time_scale_shift="scale_shift": both compute
norm(h) * (1 + scale) + shift with [scale, shift] in that order.
"""
from __future__ import annotations

import torch
from torch import nn

# through nn.unet, which holds (or imports) every block of the UNet
from ..nn.unet import AttentionBlock, Downsample, ResBlock, UNet, UNetConfig, Upsample, heads_for

_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                 "conv2": "conv2", "skip": "conv_shortcut"}


def _attention_head_dim(cfg: UNetConfig) -> tuple[int | None, str | None]:
    """UNet2DModel's single attention_head_dim for our layout, or (None, reason) when none fits.

    UNet2DModel gives every attention layer heads = channels // attention_head_dim (or one head
    when attention_head_dim is None); ours fixes num_heads or head_dim. They agree when all
    attention layers (the middle one included) have one head, or share one head size.
    """
    resolutions = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mult))]
    channels = {cfg.base_channels * m for m, r in zip(cfg.channel_mult, resolutions) if r in cfg.attention_resolutions}
    channels.add(cfg.base_channels * cfg.channel_mult[-1])
    heads = {c: heads_for(cfg, c) for c in channels}
    if all(h == 1 for h in heads.values()):
        return None, None
    head_dims = {c // h for c, h in heads.items()}
    if len(head_dims) == 1:
        return head_dims.pop(), None
    layout = ", ".join(f"{c} channels: {h} heads" for c, h in sorted(heads.items()))
    return None, (f"the attention layers have different head sizes ({layout}) but UNet2DModel uses one "
                  "attention_head_dim everywhere; train with head_dim > 0 instead of num_heads")


def unet2d_incompatibility(cfg: UNetConfig) -> str | None:
    """Why a UNet with this config has no UNet2DModel counterpart, or None when it maps exactly."""
    if cfg.num_classes:
        return (f"the model is class-conditional (num_classes={cfg.num_classes}): diffusekit multiplies a class "
                "embedding into every residual block (h * (1 + c)), while UNet2DModel adds one to the time "
                "embedding; only unconditional UNets map")
    if getattr(cfg, "text_conditioning", "none") != "none":
        return (f"the model is text-conditioned (text_conditioning={cfg.text_conditioning!r}); text-to-image "
                "export (UNet2DConditionModel) is not supported yet")
    if cfg.channel_mult[0] != 1:
        return (f"channel_mult starts with {cfg.channel_mult[0]}: the time code has base_channels="
                f"{cfg.base_channels} frequencies, UNet2DModel uses block_out_channels[0]="
                f"{cfg.base_channels * cfg.channel_mult[0]}; only channel_mult[0] == 1 maps")
    if cfg.num_res_blocks < 1:
        return ("num_res_blocks=0: the encoder then never changes its channel count, while UNet2DModel's "
                "down blocks do so in their first residual block")
    if cfg.max_period != 10000.0:
        return f"max_period={cfg.max_period} (UNet2DModel's sinusoidal time code has max_period 10000)"
    return _attention_head_dim(cfg)[1]


def unet2d_config(cfg: UNetConfig) -> dict:
    """The UNet2DModel config.json (without _class_name) of a UNet whose layout maps (unet2d_incompatibility)."""
    resolutions = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mult))]
    attn = [r in cfg.attention_resolutions for r in resolutions]
    return dict(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2D", block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks, mid_block_scale_factor=1, downsample_padding=1,
        downsample_type="conv", upsample_type="conv", dropout=cfg.dropout, act_fn="silu",
        attention_head_dim=_attention_head_dim(cfg)[0], norm_num_groups=cfg.groups,
        attn_norm_num_groups=cfg.groups, norm_eps=1e-5,   # nn.GroupNorm's default eps, which ours use
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        add_attention=True, class_embed_type=None, num_class_embeds=None)


def _params(module: nn.Module, prefix: str, names: dict | None = None) -> dict[str, torch.Tensor]:
    """module's tensors under prefix, with its child names renamed by `names`."""
    out = {}
    for key, value in module.state_dict().items():
        child, _, rest = key.partition(".")
        child = (names or {}).get(child, child)
        out[f"{prefix}.{child}.{rest}" if rest else f"{prefix}.{child}"] = value
    return out


def _attention_params(attn: AttentionBlock, prefix: str) -> dict[str, torch.Tensor]:
    # rows of the fused qkv projection are [q; k; v], each split into heads the same way as diffusers'
    q, k, v = attn.qkv.weight.chunk(3, dim=0)
    qb, kb, vb = attn.qkv.bias.chunk(3, dim=0)
    out = _params(attn.norm, f"{prefix}.group_norm")
    out.update({f"{prefix}.to_q.weight": q, f"{prefix}.to_q.bias": qb, f"{prefix}.to_k.weight": k,
                f"{prefix}.to_k.bias": kb, f"{prefix}.to_v.weight": v, f"{prefix}.to_v.bias": vb})
    out.update(_params(attn.proj, f"{prefix}.to_out.0"))
    return out


def _block_params(block: nn.Sequential, prefix: str, i: int, sampler_name: str) -> dict[str, torch.Tensor]:
    """One encoder/decoder entry: ResBlock [+ AttentionBlock] [+ Down/Upsample]."""
    out = {}
    for layer in block:
        if isinstance(layer, ResBlock):
            out.update(_params(layer, f"{prefix}.resnets.{i}", _RESNET_NAMES))
        elif isinstance(layer, AttentionBlock):
            out.update(_attention_params(layer, f"{prefix}.attentions.{i}"))
        elif isinstance(layer, (Downsample, Upsample)):
            out.update(_params(layer.conv, f"{prefix}.{sampler_name}.0.conv"))
        else:
            raise ValueError(f"{type(layer).__name__} at {prefix} has no UNet2DModel counterpart.")
    return out


def unet2d_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under UNet2DModel's names (see the module docstring), as contiguous CPU tensors."""
    reason = unet2d_incompatibility(model.config)
    if reason:
        raise ValueError(f"this UNet does not map onto UNet2DModel: {reason}.")
    cfg, enc = model.config, model.encoder
    out = _params(model.time_embed.mlp[0], "time_embedding.linear_1")
    out.update(_params(model.time_embed.mlp[2], "time_embedding.linear_2"))
    out.update(_params(enc.input_conv, "conv_in"))
    level, i = 0, 0
    for block in enc.down:
        if isinstance(block[0], Downsample):
            out.update(_block_params(block, f"down_blocks.{level}", 0, "downsamplers"))
            level, i = level + 1, 0
        else:
            out.update(_block_params(block, f"down_blocks.{level}", i, "downsamplers"))
            i += 1
    for j, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        layer = enc.middle[j]
        out.update(_attention_params(layer, f"mid_block.{name}") if isinstance(layer, AttentionBlock)
                   else _params(layer, f"mid_block.{name}", _RESNET_NAMES))
    per_level = cfg.num_res_blocks + 1
    for k, block in enumerate(model.up):
        out.update(_block_params(block, f"up_blocks.{k // per_level}", k % per_level, "upsamplers"))
    out.update(_params(model.out_norm, "conv_norm_out"))
    out.update(_params(model.out_conv, "conv_out"))
    return {key: value.detach().float().cpu().contiguous() for key, value in out.items()}
