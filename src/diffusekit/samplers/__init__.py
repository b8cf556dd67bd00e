"""Samplers of the reverse process p: one small module per family, one registry."""
from .base import (SAMPLERS, Denoiser, Prediction, Sampler, StepInfo, get_sampler, karras_sigmas,
                   spaced_timesteps)
from . import ddpm, ddim, deis, dpm_solver, dpm_solver_3m, karras, plms, unipc  # noqa: F401  (register the samplers)
from .ddim import ddim_invert

__all__ = ["SAMPLERS", "Denoiser", "Prediction", "Sampler", "StepInfo", "get_sampler", "karras_sigmas",
           "spaced_timesteps", "ddim_invert"]
