"""Export a diffusekit model as a diffusers pipeline folder (DDPMPipeline / DDIMPipeline layout).

OUT/
  model_index.json                   which pipeline and components (only when diffusers can load it)
  scheduler/scheduler_config.json    the schedule, prediction type and sampler options
  unet/config.json + diffusion_pytorch_model.safetensors    a UNet2DModel (when the layout maps)
  diffusekit_unet/config.json + model.safetensors           our UNet as is (when it does not map)
  README.md                          how to load it, and why diffusers cannot when it cannot

Which UNet layouts map onto UNet2DModel: interop/unet2d.py (`unet2d_incompatibility`).
Nothing here imports diffusers, except to re-save a UNet2DModel that was loaded from diffusers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from ..config import ConfigError
from ..samplers import SAMPLERS, get_sampler
from .schedulers import sampler_to_diffusers_config
from .unet2d import unet2d_config, unet2d_incompatibility, unet2d_state_dict


@dataclass
class ExportResult:
    """What export_diffusers wrote: whether diffusers can load it, and if not, why."""
    out_dir: str
    diffusers_loadable: bool
    pipeline_class: str
    scheduler_class: str
    reason: str | None = None           # why the UNet has no UNet2DModel counterpart
    files: list[str] = field(default_factory=list)

    @property
    def note(self) -> str | None:
        """One line for the user when diffusers cannot load the folder: why, and what reads it (None when it can)."""
        if self.diffusers_loadable:
            return None
        return (f"diffusers cannot load this UNet ({self.reason.split(':')[0]}; no diffusers equivalent): wrote its "
                f"weights to diffusekit_unet/ with a standard {self.scheduler_class} config; "
                f"diffusekit.Pipeline.load({self.out_dir!r}) reads it (see README.md there).")


def _diffusers_version() -> dict:
    # the loader reads the version only to warn about very old or newer files; omit it when unknown
    from importlib.metadata import PackageNotFoundError, version
    try:
        return {"_diffusers_version": version("diffusers")}
    except PackageNotFoundError:
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _scheduler_config(pipe, sampler: str, timestep_spacing: str, options: dict) -> tuple[str, dict]:
    if sampler in SAMPLERS and SAMPLERS[sampler].style == "karras":
        raise ConfigError(f"sampler={sampler!r} steps in sigma space, and diffusers' DDPMPipeline / DDIMPipeline do "
                          "not call scale_model_input, which its diffusers scheduler needs; export with ddpm, ddim, "
                          "dpmpp_2m or unipc and switch schedulers in diffusers after loading "
                          "(pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)).")
    s = get_sampler(sampler, pipe.schedule, prediction_type=pipe.prediction_type, timestep_spacing=timestep_spacing,
                    **options)
    return sampler_to_diffusers_config(s)


def export_diffusers(source, out_dir: str | Path, *, sampler: str = "ddpm", timestep_spacing: str = "leading",
                     require_unet2d: bool = False, overwrite: bool = False, **sampler_options) -> ExportResult:
    """Write a run (its folder) or a Pipeline as a diffusers pipeline folder; see the module docstring.

    The scheduler config is `sampler` with `timestep_spacing` and `sampler_options` (default: DDPM
    ancestral sampling as diffusers' DDPMPipeline does it). When the UNet layout does not map onto
    UNet2DModel (class- or text-conditional models, ...) the weights are written as diffusekit's
    own (diffusekit_unet/) with a README saying why, or, with require_unet2d=True, a ConfigError.
    """
    from ..nn.unet import UNet
    from ..pipeline import Pipeline
    from .diffusers import DiffusersUNet
    pipe = source if isinstance(source, Pipeline) else Pipeline.load(source, device="cpu")
    _refuse_unexportable(pipe)
    out = Path(out_dir)
    _refuse_run_folder(out, getattr(pipe, "source", None))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new folder, or pass overwrite=True "
                          "(--overwrite) to write into it.")
    scheduler_class, scheduler_cfg = _scheduler_config(pipe, sampler, timestep_spacing, sampler_options)
    model, reason = pipe.model, None
    if isinstance(model, DiffusersUNet):
        model.unet.save_pretrained(out / "unet")
    elif isinstance(model, UNet):
        reason = unet2d_incompatibility(model.config)
        if reason and require_unet2d:
            raise ConfigError(f"this model cannot be written as a diffusers UNet2DModel: {reason}.")
        if reason:
            _write_diffusekit_unet(out / "diffusekit_unet", model, pipe)
        else:
            _write_json(out / "unet" / "config.json", {"_class_name": "UNet2DModel", **_diffusers_version(),
                                                       **unet2d_config(model.config)})
            save_file(unet2d_state_dict(model), str(out / "unet" / "diffusion_pytorch_model.safetensors"),
                      metadata={"format": "pt"})
    else:
        raise ConfigError(f"the pipeline's model is a {type(model).__name__}; export handles diffusekit's UNet and "
                          "diffusers' UNet2DModel.")
    pipeline_class = "DDIMPipeline" if scheduler_class == "DDIMScheduler" else "DDPMPipeline"
    _write_json(out / "scheduler" / "scheduler_config.json", {"_class_name": scheduler_class, **_diffusers_version(),
                                                              **scheduler_cfg})
    if reason is None:
        _write_json(out / "model_index.json", {"_class_name": pipeline_class, **_diffusers_version(),
                                               "scheduler": ["diffusers", scheduler_class],
                                               "unet": ["diffusers", "UNet2DModel"]})
    (out / "README.md").write_text(_readme(pipe, pipeline_class, scheduler_class, sampler, reason))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ExportResult(str(out), reason is None, pipeline_class, scheduler_class, reason, files)


def _refuse_unexportable(pipe) -> None:
    """What export cannot write so that it reads back as the same model: refused before writing anything."""
    if pipe.has_text:
        raise ConfigError("text-to-image runs are not exported yet (their text encoder has no diffusers folder "
                          "counterpart here); load the run itself with Pipeline.load(RUN).")
    if pipe.autoencoder is not None:
        raise ConfigError("latent runs (with an autoencoder) are not exported yet: the folder would hold the UNet "
                          "without the autoencoder it denoises for; load the run itself with Pipeline.load(RUN).")


def _refuse_run_folder(out: Path, run) -> None:
    """Never write into a run (issue 23): export would replace its model card and add model_index.json, after
    which the run loads as a diffusers folder. Refused even with overwrite: the run, a folder inside or around
    it, or any other diffusekit run folder."""
    from ..store.manifest import is_run_folder
    target = out.resolve()
    run_dir = Path(run).resolve() if run and Path(run).is_dir() else None
    if run_dir is not None and (target == run_dir or run_dir in target.parents or target in run_dir.parents):
        where = "is" if target == run_dir else "lies inside" if run_dir in target.parents else "contains"
        raise ConfigError(f"{out} {where} the run folder {run} being exported; export to a new folder outside it "
                          f"(e.g. {run_dir.name}-diffusers).")
    if out.is_dir() and is_run_folder(out):
        raise ConfigError(f"{out} is a diffusekit run folder; export to a new folder (overwrite never replaces a run).")


def _write_diffusekit_unet(folder: Path, model, pipe) -> None:
    """Our UNet's config and weights as they are, for diffusekit (load_diffusers_pipeline reads them)."""
    _write_json(folder / "config.json", {"unet": json.loads(model.config.to_json()),
                                         "prediction_type": pipe.prediction_type,
                                         "class_names": list(pipe.class_names)})
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _readme(pipe, pipeline_class: str, scheduler_class: str, sampler: str, reason: str | None) -> str:
    c, h, w = pipe.image_shape
    head = (f"# Exported from diffusekit\n\nA {'class-conditional ' if pipe.num_classes else ''}diffusion model on "
            f"{c}x{h}x{w} images (prediction_type={pipe.prediction_type!r}), schedule and sampler in "
            f"`scheduler/scheduler_config.json` ({scheduler_class}, diffusekit sampler `{sampler}`).\n\n")
    labels = ", class_labels=[0] * 16" if pipe.num_classes else ""
    ours = ("## In diffusekit\n\n```python\nfrom diffusekit import Pipeline\npipe = Pipeline.load(\"THIS_FOLDER\")"
            "   # or Pipeline.from_diffusers\n"
            f"images = pipe.sample(16, sampler=\"dpmpp_2m\", num_steps=20{labels})   # (N, C, H, W) in [-1, 1]\n"
            f"pil_images = pipe.sample(16, output=\"pil\"{labels})   # a list of PIL images\n```\n")
    if reason is None:
        theirs = (f"## In diffusers\n\n`unet/` is a `UNet2DModel`, weight for weight the diffusekit UNet.\n\n```python\n"
                  f"from diffusers import {pipeline_class}\npipe = {pipeline_class}.from_pretrained(\"THIS_FOLDER\")\n"
                  "images = pipe(batch_size=16, num_inference_steps=50).images   # PIL images\n```\n\n")
        return head + theirs + ours
    theirs = ("## In diffusers: not loadable\n\nThe UNet has no diffusers `UNet2DModel` counterpart: "
              f"{reason}.\nIts weights are in `diffusekit_unet/model.safetensors` under diffusekit's names, with "
              "the UNet config in `diffusekit_unet/config.json` (`unet`), so there is no `model_index.json`. "
              "The scheduler config is standard and loads with\n`diffusers."
              f"{scheduler_class}.from_pretrained(\"THIS_FOLDER\", subfolder=\"scheduler\")`.\n"
              "To load the model, install diffusekit (`pip install .` from its clone) and use the snippet below: "
              "it reads `diffusekit_unet/` and the scheduler config, and samples what the run sampled.\n\n")
    return head + theirs + ours
