"""The autoencoder's adversarial term: hinge losses, LDM's adaptive weight, and the discriminator's own step.

LDM (Rombach et al. 2022, appendix G) trains its autoencoders with "a perceptual loss and a patch-based
adversarial objective" after Esser et al. 2021 (VQGAN, sec. 3.1): the generator (here the decoder)
minimises rec + lambda * w * L_G with the hinge generator loss L_G = -E[D(x_rec)] and the adaptive weight

    lambda = ||grad_{G_L} rec|| / (||grad_{G_L} L_G|| + delta)       (VQGAN eq. 7, delta = 1e-4)

taken at the decoder's last layer G_L and clamped to [0, 1e4], so that the GAN gradient arriving there
is w times as large as the reconstruction's whatever the two losses' scales. The discriminator D
minimises the hinge loss  1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])  (Lim & Ye 2017), with its
own AdamW, in the same step. Before `adversarial_start` neither term exists (LDM's disc_start).

`Adversary` holds D, its optimiser and grad scaler; its state (weights, optimiser) goes into
trainer_state.pt, never into the autoencoder's weights files, so a resumed run continues it exactly
and what load_autoencoder reads is the autoencoder alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffusekit.device import autocast, grad_scaler
from diffusekit.store import CheckpointError
from diffusekit.nn.autoencoder import AutoencoderConfig
from diffusekit.nn.discriminator import PatchDiscriminator
from diffusekit.training.loop import NonFinite, clip_and_step

MAX_ADAPTIVE_WEIGHT = 1e4     # VQGAN's clamp: a vanishing GAN gradient must not blow the weight up
DELTA = 1e-4


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss: -mean D(x_rec)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||grad rec|| / (||grad L_G|| + 1e-4) at `last_layer`, clamped to [0, 1e4], detached (VQGAN eq. 7).

    Both graphs are kept (retain_graph) for the backward pass of the total loss that follows.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + DELTA)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


class Adversary:
    """The PatchGAN discriminator of an autoencoder run, its AdamW and grad scaler, and the two GAN losses."""

    def __init__(self, cfg: AutoencoderConfig, device: torch.device, precision: str, weight_decay: float = 0.0):
        self.weight, self.start = cfg.adversarial_weight, cfg.adversarial_start
        self.precision = precision
        self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.discriminator_channels,
                                                cfg.discriminator_layers).to(device)
        # betas (0.5, 0.9) as LDM's and VQGAN's GAN optimisers: a short memory for a moving target
        self.opt = torch.optim.AdamW(self.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9),
                                     weight_decay=weight_decay)
        self.scaler = grad_scaler(device, precision)

    def active(self, step: int) -> bool:
        """Whether optimiser step `step` (0-based) has the GAN terms."""
        return step >= self.start

    def generator_term(self, rec: torch.Tensor, x_rec: torch.Tensor, last_layer: torch.Tensor):
        """(w * lambda * L_G, L_G, lambda) for the autoencoder's loss; D's weights get no gradient from it.

        Call under the step's autocast; x_rec is the reconstruction `rec` was computed from.
        """
        self.discriminator.requires_grad_(False)
        try:
            g_loss = hinge_g_loss(self.discriminator(x_rec))
        finally:
            self.discriminator.requires_grad_(True)
        lam = adaptive_weight(rec, g_loss, last_layer)
        return self.weight * lam * g_loss, g_loss.detach(), lam

    def discriminator_step(self, x: torch.Tensor, x_rec: torch.Tensor, lr: float, grad_clip: float) -> dict:
        """One AdamW step of D on real x against the detached reconstructions; its loss and mean logits."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        with autocast(x.device, self.precision):
            logits_real = self.discriminator(x)
            logits_fake = self.discriminator(x_rec.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
        value = d_loss.item()
        if not math.isfinite(value):
            raise NonFinite("the discriminator loss", value)
        self.scaler.scale(d_loss).backward()
        clip_and_step(self.discriminator, self.opt, self.scaler, grad_clip)
        return {"d_loss": value, "logits_real": logits_real.float().mean().item(),
                "logits_fake": logits_fake.float().mean().item()}

    def state_dict(self) -> dict:
        """What trainer_state.pt holds of the adversary (tensors and numbers only: it is read weights_only)."""
        return {"discriminator": self.discriminator.state_dict(), "discriminator_optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict, where: str) -> None:
        if "discriminator" not in state:
            raise CheckpointError(f"{where} holds no discriminator state: it was saved with autoencoder.adversarial_weight=0. "
                           f"Resume it with the weight it was trained with, or start a new run.")
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt.load_state_dict(state["discriminator_optimizer"])
