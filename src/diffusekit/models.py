"""The network a run trains: a UNet, or a UNet with its text encoder; and latents from an autoencoder.

A text-conditioned run's model is `TextToImageModel`: forward(x, t, prompts=[...]) encodes the
prompts (a learned encoder trains with the UNet and is saved with it; a pretrained one is frozen
and kept out of the weights) and passes the token embeddings to the UNet's cross-attention, the
pooled embedding to its multiplicative context. Sampling encodes prompts once (`encode_text`) and
passes the tensors as conditioning keywords, so classifier-free guidance can batch them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .nn.unet import UNet


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
    from .nn.text import build_text_encoder
    return TextToImageModel(unet, build_text_encoder(cfg.text), trainable_text=cfg.text.kind == "learned")


# --- latents ---------------------------------------------------------------------------------------


def data_fingerprint(images: torch.Tensor) -> str:
    """A short hash of a tensor's bytes, to key caches."""
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def encode_all(autoencoder, images: torch.Tensor, device: torch.device, batch_size: int = 256,
               progress: bool = False) -> torch.Tensor:
    """Scaled latents (N, c, h, w) of images (N, C, H, W) in [-1, 1] (the posterior mode), on the CPU."""
    from tqdm.auto import tqdm
    out = []
    chunks = images.split(batch_size)
    for x in tqdm(chunks, desc="encoding latents", disable=not progress or len(chunks) < 2, leave=False):
        out.append(autoencoder.encode(x.to(device)).float().cpu())
    return torch.cat(out)


def cached_latents(autoencoder, ae_fingerprint: str, images: torch.Tensor, cache_dir: Path,
                   device: torch.device, progress: bool = False) -> torch.Tensor:
    """encode_all, cached in cache_dir/latents-KEY.safetensors; the key changes with the data or the autoencoder."""
    from safetensors.torch import load_file

    from .store import write_weights_atomic
    key = hashlib.sha256(f"{data_fingerprint(images)}-{ae_fingerprint}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if path.exists():
        return load_file(str(path))["latents"]
    latents = encode_all(autoencoder, images, device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("latents-*.safetensors"):
        old.unlink()                         # a cache of other data or another autoencoder is stale
    write_weights_atomic(path, {"latents": latents}, {"data": data_fingerprint(images), "autoencoder": ae_fingerprint})
    return latents
