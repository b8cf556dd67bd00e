"""diffusekit: denoising diffusion models to train, sample and edit."""
from .config import Config, ConfigError
from .schedule import NoiseSchedule, ScheduleConfig
from .samplers import SAMPLERS, Denoiser, Sampler, ddim_invert, get_sampler

__version__ = "0.1.0"


def __getattr__(name):
    # heavier pieces load on first use so `import diffusekit` stays light
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "NoiseSchedule", "ScheduleConfig", "SAMPLERS", "Denoiser", "Sampler",
           "ddim_invert", "get_sampler", "Pipeline"]
