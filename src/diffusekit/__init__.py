"""diffusekit: denoising diffusion models to train, sample and edit."""
from .config import Config, ConfigError
from .progress import progress_bars
from .schedule import NoiseSchedule, ScheduleConfig
from .samplers import SAMPLERS, Denoiser, Sampler, ddim_invert, get_sampler

__version__ = "0.1.0"


_LAZY_MODULES = ("guidance", "editing", "metrics", "evaluation", "data", "viz", "training", "pipeline", "toy",
                 "store", "nn")
_FROM_VIZ = ("save_grid", "make_grid", "to_pil")     # dk.save_grid(pipe.sample(16), "grid.png"), dk.to_pil(...)


def __getattr__(name):
    # heavier pieces load on first use so `import diffusekit` stays light
    import importlib
    if name == "Pipeline":
        return importlib.import_module(".pipeline", __name__).Pipeline
    if name in _FROM_VIZ:
        return getattr(importlib.import_module(".viz", __name__), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "NoiseSchedule", "ScheduleConfig", "SAMPLERS", "Denoiser", "Sampler",
           "ddim_invert", "get_sampler", "progress_bars", "Pipeline", "save_grid", "make_grid", "to_pil"]
