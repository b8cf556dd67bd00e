"""diffusers interoperability: scheduler configs, UNet2DModel weights, pipeline folders in and out
(DDPM / DDIM pixel pipelines and the StableDiffusionPipeline text-to-image layout).

Nothing here imports diffusers at import time; loading a diffusers folder needs it installed.
"""
from .diffusers import (DiffusersFolder, DiffusersUNet, diffusers_pipeline_parts, is_diffusers_folder,
                        read_diffusers_folder)
from .export import ExportResult, export_diffusers
from .lora import export_diffusers_lora
from .schedulers import (SCHEDULER_CLASSES, sampler_from_diffusers_config, sampler_to_diffusers_config,
                         schedule_from_diffusers_config, schedule_to_diffusers_config)
from .text_to_image import DiffusersTextEncoder, DiffusersTextUNet
from .unet2d import unet2d_config, unet2d_incompatibility, unet2d_state_dict


def load_diffusers_pipeline(path, device="auto", precision: str = "auto", *, null_class_label: int | None = None):
    """A local diffusers pipeline folder as a diffusekit Pipeline (see diffusers_pipeline_parts)."""
    from ..pipeline import Pipeline
    return Pipeline.from_diffusers(path, device=device, precision=precision, null_class_label=null_class_label)


__all__ = ["DiffusersFolder", "DiffusersTextEncoder", "DiffusersTextUNet", "DiffusersUNet", "ExportResult",
           "SCHEDULER_CLASSES", "diffusers_pipeline_parts", "export_diffusers", "export_diffusers_lora",
           "is_diffusers_folder", "load_diffusers_pipeline",
           "read_diffusers_folder", "sampler_from_diffusers_config", "sampler_to_diffusers_config",
           "schedule_from_diffusers_config", "schedule_to_diffusers_config", "unet2d_config",
           "unet2d_incompatibility", "unet2d_state_dict"]
