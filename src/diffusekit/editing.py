"""Editing with an ordinary sampler: SDEdit, DDIM inversion and reconstruction, inpainting (RePaint).

Nothing here has its own update rule: SDEdit starts a sampler part-way (start_step), inversion is
samplers.ddim.ddim_invert on a DDIM plan, and inpainting constrains any sampler through its
per-step callback. Images are tensors (B, ...) in the VP convention's data space, e.g. [-1, 1].
"""
from __future__ import annotations

import math

import torch

from .samplers.base import Denoiser, Sampler, randn_like
from .samplers.ddim import ddim_invert


def _noised(x0: torch.Tensor, abar: float, generator: torch.Generator | None) -> torch.Tensor:
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps   (DDPM eq. 4)
    if abar >= 1.0:
        return x0
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * randn_like(x0, generator)


# --- SDEdit --------------------------------------------------------------------------------

def sdedit(sampler: Sampler, model, image: torch.Tensor, strength: float, num_steps: int,
           generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise the image part-way with q(x_t | x0), then denoise with any sampler.

    strength S in [0, 1] is the fraction of the num_steps plan that is re-run: the sampler starts at
    start_step = num_steps - round(S * num_steps). S = 0 returns the input unchanged; S = 1 ignores
    the image and samples from pure noise, exactly as sampler.sample(model, randn(generator), ...).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength!r} is out of range; it must lie in [0, 1] "
                         "(0 keeps the input, 1 samples from pure noise).")
    ts, abars = sampler.plan(num_steps)
    n_run = int(math.floor(strength * num_steps + 0.5))
    if n_run == 0:
        return image.clone()
    start_step = num_steps - n_run
    noise = randn_like(image, generator)
    if start_step == 0:
        x_t = noise  # pure noise, as plain sampling starts (abar_T is tiny but not 0 for most schedules)
    else:
        abar = float(abars[start_step])
        # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps   (DDPM eq. 4) at the plan's level for start_step
        x_t = math.sqrt(abar) * image + math.sqrt(1 - abar) * noise
    return sampler.sample(model, x_t, num_steps, generator=generator, start_step=start_step, **cond)


# --- DDIM inversion ------------------------------------------------------------------------

def _check_ddim(sampler: Sampler) -> Sampler:
    if sampler.name != "ddim" or float(sampler.options.get("eta", 0.0)) != 0.0:
        raise ValueError(f"DDIM inversion needs a deterministic DDIM sampler (get_sampler('ddim', schedule, "
                         f"eta=0.0, ...)); got {sampler!r}.")
    return sampler


def invert(sampler: Sampler, model, image: torch.Tensor, num_steps: int, refine_steps: int = 0,
           callback=None, **cond) -> torch.Tensor:
    """DDIM inversion x0 -> x_T (Song et al. 2021, sec. 4.3; Mokady et al. 2023): the eta = 0 update backwards.

    sampler is a DDIM sampler (eta = 0) bound to the schedule, prediction type and spacing;
    reconstruct(sampler, model, x_T, num_steps) maps x_T back to the image. refine_steps > 0 solves
    each inverse step as a fixed point, which makes that round trip near-exact. model is a network of
    the sampler's prediction type or a Denoiser (e.g. a guidance wrapper). callback(StepInfo) as for sampling.
    """
    if refine_steps < 0:
        raise ValueError(f"refine_steps={refine_steps!r}; use 0 (plain inversion) or a positive count.")
    ts, abars = _check_ddim(sampler).plan(num_steps)
    denoiser = model if isinstance(model, Denoiser) else Denoiser(model, sampler.prediction_type,
                                                                  sampler.clip_sample)
    return ddim_invert(denoiser, image, ts, abars, refine_steps=refine_steps, callback=callback, cond=cond)


def reconstruct(sampler: Sampler, model, x_T: torch.Tensor, num_steps: int, callback=None, **cond) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) sampling from an inverted x_T: the decoder half of invert."""
    return _check_ddim(sampler).sample(model, x_T, num_steps, callback=callback, **cond)


# --- inpainting ----------------------------------------------------------------------------

def _one_step(sampler: Sampler, model, x: torch.Tensor, num_steps: int, i: int, generator, cond) -> torch.Tensor:
    """Step i of the num_steps plan alone: x at abars[i] -> x at abars[i + 1], in the VP convention.

    A multistep solver starts fresh here, so its step is first order (its history would be stale
    after re-noising anyway).
    """
    return sampler.sample(model, x, num_steps, generator=generator, start_step=i, stop_step=i + 1, **cond)


def _check_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    try:
        fits = torch.broadcast_shapes(mask.shape, image.shape) == image.shape
    except RuntimeError:
        fits = False
    if not fits or mask.ndim > image.ndim:
        raise ValueError(f"mask has size {tuple(mask.shape)} but the image has size {tuple(image.shape)}; "
                         "the mask must have the image's size, or broadcast to it (e.g. "
                         f"{(1, 1, *image.shape[2:]) if image.ndim == 4 else (1, *image.shape[1:])}).")
    if mask.device.type != "meta" and (bool(((mask < 0) | (mask > 1)).any()) or not bool(torch.isfinite(mask).all())):
        raise ValueError("mask values must lie in [0, 1] (1 = fill, 0 = keep); got values from "
                         f"{float(mask.min())} to {float(mask.max())}.")
    return mask.to(device=image.device, dtype=image.dtype)


def inpaint(sampler: Sampler, model, image: torch.Tensor, mask: torch.Tensor, num_steps: int,
            generator: torch.Generator | None = None, resample: int = 1, **cond) -> torch.Tensor:
    """Fill the masked region of image with any sampler; mask: 1 = fill (unknown), 0 = keep.

    After every step the known pixels are put back, noised with q(x_t | x0) to the current level
    (the replacement method; RePaint, Lugmayr et al. 2022, eq. 8). resample = r > 1 adds RePaint's
    resampling (Alg. 1, jump length 1): each step is redone r times, re-noising x in between with the
    forward transition q(x_i | x_{i+1}) so the filled region harmonises with the known one. With r > 1
    every sampler works, but each step then runs on its own (see _one_step): multistep solvers
    (dpmpp_2m, unipc) take first-order steps, and Heun keeps its two evaluations per step.
    Pixels with mask 0 in the result equal the input's exactly.
    """
    if not isinstance(resample, int) or isinstance(resample, bool) or resample < 1:
        raise ValueError(f"resample={resample!r}; use an integer >= 1 (1 = no RePaint resampling).")
    mask = _check_mask(image, mask)
    ts, abars = sampler.plan(num_steps)

    def put_back(x: torch.Tensor, abar_next: float) -> torch.Tensor:
        # x <- m * x_unknown + (1 - m) * x_known,  x_known ~ q(x_t | x0)   (RePaint eq. 8)
        return mask * x + (1 - mask) * _noised(image, abar_next, generator)

    x = randn_like(image, generator)
    if resample == 1:
        x = sampler.sample(model, x, num_steps, generator=generator,
                           callback=lambda info: put_back(info.x, info.abar_next), **cond)
    else:
        for i in range(len(ts)):
            abar, abar_next = float(abars[i]), float(abars[i + 1])
            x_i = x
            for u in range(resample):
                x = put_back(_one_step(sampler, model, x_i, num_steps, i, generator, cond), abar_next)
                if u == resample - 1 or i == len(ts) - 1:
                    break  # RePaint does not resample the final step
                # x_i ~ q(x_i | x_{i+1}) = N(sqrt(abar_i / abar_{i+1}) x_{i+1}, (1 - abar_i / abar_{i+1}) I)
                # (DDPM eq. 2 over the skipped training steps; RePaint Alg. 1, line 11)
                ratio = abar / abar_next
                x_i = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * randn_like(x, generator)
    # the known pixels exactly, whatever rounding the last blend did
    return torch.where(mask == 0, image, mask * x + (1 - mask) * image)
