"""Local diffusers pipeline folders in diffusekit: DDPMPipeline / DDIMPipeline and StableDiffusionPipeline layouts.

A pixel folder holds model_index.json, unet/ (a UNet2DModel: config.json + weights) and scheduler/
(scheduler_config.json). The UNet is wrapped once (`DiffusersUNet`) to diffusekit's model
contract model(x, t, **cond); the scheduler config gives the schedule and the prediction type.
A latent text-to-image folder adds vae/, text_encoder/ and tokenizer/ and has a
UNet2DConditionModel: its wrapper and checks live in interop/text_to_image.py.
The folder's scheduler is the Pipeline's default sampler (`Pipeline.default_sampler_options`,
interop/folder_sampler.py); `DiffusersFolder.sampler()` is that conversion, which names any option
without a diffusekit counterpart. The scheduler config is checked when the folder loads: a class
diffusers does not have, or a key no mapped class has, is refused there.

Export (`export_diffusers`) lives in interop/export.py and is re-exported here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..schedule import PREDICTION_TYPES
from .schedulers import SPECS, check_config_keys, sampler_from_diffusers_config, schedule_from_diffusers_config
from .weights import load_component, load_safetensors_into
from .text_to_image import (NOT_RUN, DiffusersTextEncoder, DiffusersTextUNet, check_text_to_image_components,
                            check_text_to_image_unet, is_text_to_image)

__all__ = ["DiffusersFolder", "DiffusersUNet", "ExportResult", "export_diffusers", "is_diffusers_folder",
           "diffusers_pipeline_parts", "read_diffusers_folder"]

# the component classes of the layouts we drive
SUPPORTED_UNETS = ("UNet2DModel",)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin")
# what each component folder must hold: (config file or None, weight files of which one must exist)
_FOLDER_FILES = {
    "unet": ("config.json", WEIGHT_FILES), "vae": ("config.json", WEIGHT_FILES),
    "scheduler": ("scheduler_config.json", ()),
    "text_encoder": ("config.json", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")),
    "tokenizer": (None, ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model")),
}
# components of pipelines we cannot drive yet, with what they are
_UNSUPPORTED_COMPONENTS = {
    "vae": "a latent pipeline (vae/) without a text encoder", "vqvae": "a latent pipeline (vqvae/)",
    "transformer": "a transformer denoiser (DiT-style) instead of a UNet", "prior": "a prior model",
}


@dataclass
class DiffusersFolder:
    """What a Pipeline loaded from a diffusers folder came from (Pipeline.config for such a pipeline)."""
    path: str
    pipeline_class: str
    unet_class: str
    unet_config: dict = field(default_factory=dict)
    scheduler_class: str = ""
    scheduler_config: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)    # name -> class, from model_index.json
    not_run: tuple = ()                               # listed components diffusekit does not run (safety_checker)

    def sampler(self) -> tuple[str, dict]:
        """(sampler name, Pipeline.sample keyword arguments) equivalent to the folder's scheduler:
        `pipe.sample(n, sampler=name, **options)` (the prediction type is the Pipeline's already).

        Raises ConfigError naming the option when the scheduler has one without a counterpart.
        """
        name, kwargs = sampler_from_diffusers_config(self.scheduler_config, self.scheduler_class)
        kwargs.pop("prediction_type")
        return name, kwargs

    @property
    def text_to_image(self) -> bool:
        """Whether the folder is the latent text-to-image layout (StableDiffusionPipeline's)."""
        return is_text_to_image(self.components)


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel behind diffusekit's model contract: forward(x, t, class_labels=None) -> prediction.

    t is a (B,) float tensor in training-timestep units (fractional values are fine: the
    sinusoidal code is continuous). For a class-conditional UNet (num_class_embeds), label -1 is
    diffusekit's null class; diffusers' UNet2DModel has none unless the model was trained with
    one, so -1 is mapped to `null_class_label` when given and refused otherwise. A UNet that also
    outputs variances (out_channels = 2 * in_channels) returns its first half, the prediction.
    """

    def __init__(self, unet: nn.Module, null_class_label: int | None = None):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.in_channels, self.out_channels = int(cfg.in_channels), int(cfg.out_channels)
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ConfigError(f"the UNet has in_channels={self.in_channels} and out_channels={self.out_channels}; "
                              "diffusekit needs a prediction shaped like its input (or twice the channels, "
                              "prediction then learned variances).")
        if cfg.get("class_embed_type") is not None:
            raise ConfigError(f"the UNet has class_embed_type={cfg.class_embed_type!r} (continuous class inputs); "
                              "diffusekit drives integer class labels only (class_embed_type=None with "
                              "num_class_embeds).")
        self.num_classes = int(cfg.get("num_class_embeds") or 0)
        if null_class_label is not None and not 0 <= null_class_label < self.num_classes:
            raise ConfigError(f"null_class_label={null_class_label} is not a class of this UNet "
                              f"(num_class_embeds={self.num_classes}).")
        self.null_class_label = null_class_label

    def _labels(self, class_labels, batch: int, device) -> torch.Tensor | None:
        if not self.num_classes:
            if class_labels is not None:
                raise ConfigError("class_labels were given but this diffusers UNet is unconditional "
                                  "(no num_class_embeds); drop the class labels.")
            return None
        if class_labels is None:
            class_labels = -1
        labels = torch.as_tensor(class_labels, device=device).long()
        labels = labels.expand(batch) if labels.ndim == 0 else labels
        if bool((labels < 0).any()):
            if self.null_class_label is None:
                raise ConfigError(
                    f"this diffusers UNet is class-conditional (num_class_embeds={self.num_classes}) and has no null "
                    "class, so unconditional sampling and classifier-free guidance (guidance_scale != 1) are not "
                    "available; give class labels with guidance_scale=1, or load with null_class_label=K if the "
                    "model was trained with label K as its null class.")
            labels = torch.where(labels < 0, torch.full_like(labels, self.null_class_label), labels)
        return labels

    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.unet(x, t, class_labels=self._labels(class_labels, x.shape[0], x.device)).sample
        return out[:, :self.in_channels]


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno}; repair or re-save "
                          "the pipeline with save_pretrained.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} ({what}) holds {type(data).__name__}, not a JSON object.")
    return data


def _not_a_pipeline(path: Path) -> ConfigError:
    hint = ""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        hint = " It looks like a diffusekit run: load it with Pipeline.load(path)."
    elif (path / "unet").is_dir() and (path / "scheduler").is_dir():
        hint = (" It has unet/ and scheduler/, so it is a pipeline folder missing the index that save_pretrained "
                "writes: copy model_index.json from where the folder came from, or write one naming the classes, "
                'e.g. {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], '
                '"scheduler": ["diffusers", "DDPMScheduler"]}.')
    elif (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES):
        hint = (" It looks like a single diffusers model folder: put it in unet/ beside a scheduler/ folder and a "
                "model_index.json (DDPMPipeline(unet, scheduler).save_pretrained(path) writes all three).")
    return ConfigError(f"{path} is not a diffusers pipeline folder: it has no model_index.json.{hint}")


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether path looks like a diffusers pipeline folder (or an export_diffusers folder) rather than a run:
    the CLI's test for taking Pipeline.from_diffusers instead of Pipeline.load."""
    path = Path(path)
    # unet/ + scheduler/ without model_index.json is an incomplete pipeline folder, not a run:
    # read_diffusers_folder then says what is missing
    return ((path / "model_index.json").is_file() or (path / "scheduler").is_dir()
            and ((path / "diffusekit_unet").is_dir() or (path / "unet").is_dir()))


def read_diffusers_folder(path: str | Path) -> DiffusersFolder:
    """Check a local diffusers pipeline folder and read its configs; errors name what is missing or unsupported."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give the folder a diffusers pipeline was saved to "
                          "(save_pretrained), holding model_index.json, unet/ and scheduler/.")
    if not (path / "model_index.json").is_file():
        raise _not_a_pipeline(path)
    index = read_json(path / "model_index.json", "the pipeline index")
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[-1]}
    pipeline_class = str(index.get("_class_name", "?"))
    classes = {k: v[-1] for k, v in components.items()}
    if is_text_to_image(classes):
        check_text_to_image_components(path, pipeline_class, classes)
    else:
        _check_components(path, pipeline_class, components)
    for name in sorted(set(components) & set(_FOLDER_FILES)):
        _check_files(path, name)
    unet_config = read_json(path / "unet" / "config.json", "the UNet config")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config")
    return DiffusersFolder(str(path), pipeline_class, components["unet"][-1], unet_config,
                           str(scheduler_config.get("_class_name", components["scheduler"][-1])), scheduler_config,
                           components=classes,
                           not_run=tuple(k for k in NOT_RUN if k in components))


def _check_files(path: Path, name: str) -> None:
    config, weights = _FOLDER_FILES[name]
    incomplete = "the folder is incomplete (copy it again, or re-save the pipeline with save_pretrained)"
    if not (path / name).is_dir():
        raise ConfigError(f"{path} lists a {name} in model_index.json but has no {name}/ folder; {incomplete}.")
    if config and not (path / name / config).is_file():
        raise ConfigError(f"{path} lists a {name} in model_index.json but {name}/{config} is missing; {incomplete}.")
    if weights and not any((path / name / w).is_file() for w in weights):
        what = "tokenizer files" if name == "tokenizer" else "weights"
        raise ConfigError(f"{path}/{name} has no {what} (none of {list(weights)}); {incomplete}.")


def _check_components(path: Path, pipeline_class: str, components: dict) -> None:
    """The pixel layout (a text-to-image one is checked by check_text_to_image_components)."""
    for name, what in _UNSUPPORTED_COMPONENTS.items():
        if name in components:
            raise ConfigError(f"{path} ({pipeline_class}) has {what}, which diffusekit cannot drive yet; it loads "
                              "DDPMPipeline / DDIMPipeline folders (unet/ with a UNet2DModel, scheduler/) and "
                              "StableDiffusionPipeline folders (unet/ with a UNet2DConditionModel, vae/, "
                              "text_encoder/, tokenizer/, scheduler/).")
    for name in ("unet", "scheduler"):
        if name not in components:
            raise ConfigError(f"{path} ({pipeline_class}) has no {name} component in model_index.json (it has "
                              f"{sorted(components)}); diffusekit needs unet/ and scheduler/.")
    if components["unet"][-1] not in SUPPORTED_UNETS:
        raise ConfigError(f"{path}: unet is a {components['unet'][-1]}, which diffusekit cannot drive; supported: "
                          f"{list(SUPPORTED_UNETS)}.")
    others = sorted(set(components) - {"unet", "scheduler"})
    if others:
        raise ConfigError(f"{path} ({pipeline_class}) has components {others} besides unet and scheduler; "
                          "diffusekit does not know what they do, so it will not drive the pipeline without them.")


def _check_vp_scheduler(folder: DiffusersFolder) -> None:
    cfg = folder.scheduler_config
    if not any(k in cfg for k in ("beta_schedule", "trained_betas", "beta_start")):
        raise ConfigError(f"{folder.path}: the scheduler {folder.scheduler_class} has no beta schedule (a "
                          "variance-exploding or continuous-time scheduler); diffusekit drives variance-preserving "
                          "(beta) schedules only.")
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{folder.path}: the scheduler says prediction_type={prediction_type!r}; diffusekit's "
                          f"samplers take {list(PREDICTION_TYPES)}.")


def diffusers_pipeline_parts(path: str | Path, device: str | torch.device = "auto", precision: str = "auto", *,
                             null_class_label: int | None = None) -> dict:
    """The Pipeline arguments of a local DDPMPipeline / DDIMPipeline or StableDiffusionPipeline folder
    (Pipeline.from_diffusers builds the Pipeline; this module imports no pipeline, so no circle).

    Needs `pip install diffusers` (and transformers for a text encoder). The schedule and prediction
    type come from scheduler/scheduler_config.json, and its sampler settings (spacing, steps_offset,
    set_alpha_to_one, clip_sample, thresholding, variance_type, ...) are the Pipeline's sampling
    defaults: `pipe.sample(n)` samples as the folder's own scheduler does, and a named sampler keeps
    what carries over (Pipeline.default_sampler_options).
    A text-to-image folder gives a Pipeline with prompts, the VAE as its autoencoder (image_shape
    in pixels, latent_shape the UNet's). A folder written by `export_diffusers` for a model without
    a UNet2DModel counterpart (diffusekit_unet/ instead of unet/) loads too.
    """
    from ..device import resolve_device
    path = Path(path)
    if (path / "diffusekit_unet").is_dir() and not (path / "unet").exists():
        parts = _exported_unet_parts(path, resolve_device(device), precision)
        parts["scheduler_config"] = read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config")
        return parts
    folder = read_diffusers_folder(path)
    _check_vp_scheduler(folder)
    diffusers = _import_diffusers()
    _check_scheduler_class(folder, diffusers)
    schedule = schedule_from_diffusers_config(folder.scheduler_config)
    device = resolve_device(device)
    if folder.text_to_image:
        if null_class_label is not None:
            raise ConfigError(f"null_class_label={null_class_label} was given but {path} is a text-to-image pipeline "
                              "(no class labels; its unconditional branch is the empty prompt); drop it.")
        return _load_text_to_image(folder, schedule, device, precision)
    unet = load_component(diffusers.UNet2DModel, path, "unet")
    model = DiffusersUNet(unet, null_class_label=null_class_label).to(device).eval()
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return dict(model=model, schedule=schedule, image_shape=(unet.config.in_channels, height, width),
                prediction_type=folder.scheduler_config.get("prediction_type", "epsilon"),
                num_classes=model.num_classes, config=folder, device=device, precision=precision,
                source=str(path), scheduler_config=folder.scheduler_config)


def _check_scheduler_class(folder: DiffusersFolder, diffusers) -> None:
    """A scheduler class diffusers does not have, or a key that no mapped class has, is refused at load."""
    name = folder.scheduler_class
    if any(s.class_name == name for s in SPECS):
        check_config_keys(folder.scheduler_config, name)
    elif not hasattr(diffusers, name) or not name.endswith("Scheduler"):
        raise ConfigError(f"{folder.path}/scheduler/scheduler_config.json names the class {name!r}, which is not a "
                          f"diffusers scheduler (diffusers {diffusers.__version__}); set its \"_class_name\" to the "
                          f"scheduler the model was trained with, e.g. \"DDPMScheduler\" or one of "
                          f"{sorted({s.class_name for s in SPECS})}.")


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ConfigError("loading a diffusers folder needs the diffusers package; pip install diffusers.") from e
    return diffusers


def _load_text_to_image(folder: DiffusersFolder, schedule, device: torch.device, precision: str):
    """A checked StableDiffusionPipeline folder as a Pipeline: UNet + text encoder the model, VAE the autoencoder."""
    from ..nn.autoencoder import DiffusersAutoencoder
    diffusers, path = _import_diffusers(), Path(folder.path)
    vae_config = read_json(path / "vae" / "config.json", "the VAE config")
    text = DiffusersTextEncoder.from_folders(path / "text_encoder", path / "tokenizer",
                                             folder.components["text_encoder"])
    check_text_to_image_unet(path, folder.unet_config, int(vae_config.get("latent_channels", 4)), text.dim)
    unet = load_component(diffusers.UNet2DConditionModel, path, "unet")
    vae = load_component(diffusers.AutoencoderKL, path, "vae")
    # StableDiffusionPipeline's latents are z * scaling_factor (it has no shift_factor)
    autoencoder = DiffusersAutoencoder(vae.eval().requires_grad_(False), shift_factor=0.0)
    model = DiffusersTextUNet(unet.eval().requires_grad_(False), text).to(device).eval()
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    latent_shape = (int(unet.config.in_channels), int(height), int(width))
    f = autoencoder.downsample_factor         # pixels per latent cell: 2^(len(block_out_channels) - 1)
    image_shape = (autoencoder.in_channels, height * f, width * f)
    return dict(model=model, schedule=schedule, image_shape=image_shape, latent_shape=latent_shape,
                autoencoder=autoencoder, prediction_type=folder.scheduler_config.get("prediction_type", "epsilon"),
                config=folder, device=device, precision=precision, source=str(path),
                scheduler_config=folder.scheduler_config)


def _exported_unet_parts(path: Path, device: torch.device, precision: str) -> dict:
    """Pipeline arguments of a folder that export_diffusers wrote with diffusekit_unet/ (no UNet2DModel layout)."""
    from ..nn.unet import UNet, UNetConfig
    path = Path(path)
    for f in ("diffusekit_unet/config.json", "diffusekit_unet/model.safetensors", "scheduler/scheduler_config.json"):
        if not (path / f).is_file():
            raise ConfigError(f"{path} has diffusekit_unet/ but {f} is missing; export the run again.")
    meta = read_json(path / "diffusekit_unet" / "config.json", "the diffusekit UNet config")
    cfg = UNetConfig.from_dict(meta["unet"])
    model = UNet(cfg)
    load_safetensors_into(model, path / "diffusekit_unet" / "model.safetensors",
                          str(path / "diffusekit_unet" / "config.json"))
    schedule = schedule_from_diffusers_config(read_json(path / "scheduler" / "scheduler_config.json", "scheduler"))
    return dict(model=model.to(device), schedule=schedule,
                image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
                prediction_type=meta.get("prediction_type", "epsilon"), num_classes=cfg.num_classes,
                class_names=meta.get("class_names") or (), config=meta, device=device, precision=precision,
                source=str(path))
