"""The network a run trains: a UNet, or a UNet with its text encoder.

A text-conditioned run's model is `TextToImageModel`: forward(x, t, prompts=[...]) encodes the
prompts (a learned encoder trains with the UNet and is saved with it; a pretrained one is frozen
and kept out of the weights) and passes the token embeddings to the UNet's cross-attention, the
pooled embedding to its multiplicative context. Sampling encodes prompts once (`encode_text`) and
passes the tensors as conditioning keywords, so classifier-free guidance can batch them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from diffusekit.nn.unet import UNet


class TextToImageModel(nn.Module):
    """A UNet with a text encoder; state dict keys: unet.* (and text_encoder.* when it is learned)."""

    def __init__(self, unet: UNet, text_encoder: nn.Module, trainable_text: bool):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        if trainable_text:
            self.text_encoder = text_encoder
        else:
            # a tuple keeps a frozen pretrained encoder out of parameters() and state_dict()
            self._frozen_text = (text_encoder.eval().requires_grad_(False),)

    @property
    def text(self) -> nn.Module:
        return self.text_encoder if "text_encoder" in self._modules else self._frozen_text[0]

    def encode_text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's text keywords (encoder_hidden_states, encoder_attention_mask, text_embeds) on its device."""
        device = next(self.unet.parameters()).device
        return {k: v.to(device) for k, v in self.text.encode(list(prompts)).items()}

    def forward(self, x: torch.Tensor, t, prompts: Sequence[str] | None = None, **cond) -> torch.Tensor:
        if prompts is not None:
            cond = {**cond, **self.encode_text(prompts)}
        return self.unet(x, t, **cond)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) moves the frozen encoder as well
        if "_frozen_text" in self.__dict__:
            self._frozen_text[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def build_model(cfg) -> nn.Module:
    """The network of a RunConfig: UNet(cfg.model), with its text encoder when cfg.text is set."""
    unet = UNet(cfg.model)
    if getattr(cfg, "text", None) is None:
        return unet
    from diffusekit.nn.text import build_text_encoder
    return TextToImageModel(unet, build_text_encoder(cfg.text), trainable_text=cfg.text.kind == "learned")
