"""The denoising objective: one random timestep per image, MSE to the eps / x0 / v target, weightings.

Ho et al. 2020 (DDPM eq. 14) with the targets of Salimans & Ho 2022 (v) and the min-SNR-gamma
weighting of Hang et al. 2023. Randomness comes from an explicit generator, drawn on its device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusekit.config import ConfigError
from diffusekit.device import randn
from diffusekit.schedule import NoiseSchedule


def draw_t_noise(schedule: NoiseSchedule, shape, generator: torch.Generator | None, device, dtype=torch.float32):
    """t ~ U{0..T-1} of shape (B,) and eps ~ N(0, I) of `shape`, drawn on the generator's device, then moved."""
    source = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_train_timesteps, (shape[0],), generator=generator, device=source).to(device)
    return t, randn(shape, generator, device, dtype)


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str, weighting: str = "none",
                 min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights (B,) float64 of the MSE on the prediction_type target."""
    if weighting == "none":
        return torch.ones(t.shape, dtype=torch.float64)
    if weighting != "min_snr":
        raise ConfigError(f"loss weighting {weighting!r}; choose 'none' or 'min_snr'.")
    snr = schedule.snr[t.cpu().long()]
    clipped = snr.clamp(max=min_snr_gamma)
    # min-SNR-gamma, Hang et al. 2023, eq. 9 and sec. 3.4: the x0-loss weight min(SNR, gamma)
    # divided by how the target's MSE scales to the x0 MSE (SNR for eps, SNR + 1 for v)
    if prediction_type == "epsilon":
        # at SNR = 0 (zero terminal SNR) the limit of min(SNR, gamma) / SNR is 1
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-300), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, prediction_type: str,
                   generator: torch.Generator | None, weighting: str = "none", min_snr_gamma: float = 5.0,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None, **cond) -> torch.Tensor:
    """The denoising loss: one random timestep per image, MSE to the target, optional min-SNR weights.

    x0: (B, C, H, W). Draws t ~ U{0..T-1} and eps ~ N(0, I) from `generator` (on its device, then
    moved to x0's), unless t (B,) and noise are given (the trainer draws them for the global batch).
    sample_weights (B,): extra per-image factors (DreamBooth's prior-preservation weight on class images).
    Returns a scalar float32: mean_i w_i * mean_pixels (model(x_t, t) - target)^2   (DDPM eq. 14).
    """
    t, noise = draw_t_noise(schedule, x0.shape, generator, x0.device, x0.dtype) if t is None else (t, noise)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(prediction_type, x0, noise, t)
    prediction = model(x_t, t, **cond).float()
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").flatten(1).mean(1)   # (B,)
    w = loss_weights(schedule, t, prediction_type, weighting, min_snr_gamma).to(per_sample)
    if sample_weights is not None:
        w = w * sample_weights.to(per_sample)
    return (w * per_sample).mean()


