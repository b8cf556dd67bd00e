"""The fine-tuning trainer: a model you have (a diffusekit run or a local diffusers folder) taught your images.

`finetune(cfg, run_dir)` runs on the one training skeleton (training.skeleton: open, lock, build, loop,
journaled saves, exact resume) with the diffusion trainer's step (`training.diffusion.denoising_step`);
what is its own is the model (the base, opened as a Pipeline, with a LoRA adapter or all weights
trainable), what the optimiser steps and saves, and the inputs (training.finetune_data: instance
images, DreamBooth's class images).

  method="lora"  only the adapter's parameters train (its EMA too); the run stores only the adapter:
                 model.safetensors (EMA) / model_raw.safetensors hold the adapter's weights, adapter.json
                 refers to the base (path + content hash, store/adapter.py), so `Pipeline.load(RUN)` opens
                 the base with the adapter, `pipe.lora_scale` interpolates, `adapters.write_merged` folds it.
  method="full"  every weight trains; the run is a plain run (config.json = the base's run config), which
                 `Pipeline.load` reads with no adapter. Diffusekit bases only.
Both write finetune.json (the FinetuneConfig) and, for resume, the base's hash in the weights' metadata:
a resume on a base whose weights changed is refused (store.adapter.check_base).

torchrun (`torchrun --nproc_per_node N -m diffusekit finetune BASE ...`): every process runs `finetune`, on
the skeleton's process group and DistributedDataParallel (training.processes; only the trainable
parameters, a LoRA's adapter, are all-reduced). `batch_size` is the global batch: each rank takes
batch_size / N instance images (and as many class images) of every step, with the step's draws made
for the global batch (training.finetune_data), so N processes train what one process trains at the
same batch size and seed, up to float reduction order. Rank 0 alone holds the run lock, draws the
class images and writes the run folder (adapter, EMA, grids, metrics, TensorBoard).
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusekit import store
from diffusekit.config import ConfigError
from diffusekit.device import check_precision, rank_world
from diffusekit.nn.lora import lora_parameters, lora_state_dict, load_lora_state_dict
from diffusekit.store.adapter import ADAPTER_CONFIG, adapter_record, base_state_dict, check_base, is_adapter_folder
from diffusekit.store.files import content_hash
from diffusekit.store.finetune_config import FINETUNE_FILE, FINETUNE_RESUMABLE, FinetuneConfig, read_finetune_config
from diffusekit.store.run_config import weights_metadata
from diffusekit.training import skeleton
from diffusekit.training.diffusion import denoising_step
from diffusekit.training.finetune_data import FinetuneInputs, class_images, instance_images
from diffusekit.training.processes import Dist

BASE_HASH_KEY = "finetune_base_sha256"       # weights' metadata: the base's content hash when the run began


@dataclass
class FinetuneResult:
    """What `finetune` returns."""
    run_dir: Path
    step: int
    loss: float | None            # mean loss of the last logging window
    seconds: float
    method: str


def base_kind(base: str | Path) -> str:
    """"run" or "diffusers"; one line naming what a BASE must be otherwise."""
    from diffusekit.interop.diffusers import is_diffusers_folder
    path = Path(base)
    if is_adapter_folder(path):
        raise ConfigError(f"{base} is a LoRA adapter, not a base; fine-tune its base (or merge it first: "
                          "diffusekit merge RUN --out MERGED, then fine-tune MERGED).")
    if is_diffusers_folder(path):
        return "diffusers"
    if (path / store.CONFIG_FILE).is_file() and (path / store.EMA_FILE).is_file():
        return "run"
    raise ConfigError(f"{base} is neither a diffusekit run (config.json + model.safetensors) nor a diffusers "
                      "folder (model_index.json, unet/, scheduler/); give one of those as BASE.")


def open_base(cfg: FinetuneConfig, device: torch.device):
    """The base as a Pipeline (fp32 weights; the training precision is autocast)."""
    from diffusekit.pipeline import Pipeline
    kind = base_kind(cfg.base)
    if cfg.method == "full" and kind != "run":
        raise ConfigError(f"--method full writes a plain diffusekit run and needs a diffusekit run as BASE; "
                          f"{cfg.base} is a diffusers folder: use --method lora (then diffusekit merge).")
    return Pipeline.open(cfg.base, device=device, precision="fp32")


class FinetuneTrainer(skeleton.Trainer):
    """The base's network on the denoising loss of its schedule: a LoRA adapter on it, or all of it."""

    desc = "finetune"
    resumable = FINETUNE_RESUMABLE

    def __init__(self, cfg: FinetuneConfig, pipe, base_sha256: str):
        self.cfg, self.pipe, self.base_sha256, self.inputs = cfg, pipe, base_sha256, None
        self.lora = cfg.method == "lora"

    def read_config(self, folder: Path) -> FinetuneConfig:
        return read_finetune_config(folder)

    def config_json(self) -> str:
        return self.cfg.to_json() if self.lora else self.pipe.config.to_json()

    def make_model(self, device: torch.device) -> torch.nn.Module:
        if self.lora:
            from diffusekit.adapters import add_adapter
            add_adapter(self.pipe, self.cfg.adapter)          # B = 0, A seeded by the skeleton
        else:
            self.pipe.model.requires_grad_(True)
        return self.pipe.model

    def parameters(self, model: torch.nn.Module):
        return lora_parameters(model) if self.lora else model.parameters()

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return lora_state_dict(model) if self.lora else model.state_dict()

    def load_weights(self, model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
        if self.lora:
            load_lora_state_dict(model, state, where)
        else:
            super().load_weights(model, state, where)

    def metadata(self) -> dict[str, str]:
        own = {BASE_HASH_KEY: self.base_sha256, "finetune_method": self.cfg.method}
        if self.lora:
            return {**own, "adapter": json.dumps(self.cfg.adapter.to_dict())}
        return {**weights_metadata(self.pipe.config), **own}

    def step_fn(self, run: skeleton.Run):
        return denoising_step(run, self.cfg.train, self.pipe.schedule, self.pipe.prediction_type, self.inputs)

    def periodic(self, run: skeleton.Run):
        tc = self.cfg.train
        if not tc.sample_every:
            return []

        def draw(step: int) -> None:
            path = run.run_dir / "samples" / f"step_{step:06d}.png"
            run.tracker.image(step, sample_grid(self.cfg, self.pipe, run.ema.model, path))
        return [(tc.sample_every, draw)]

    def after_save(self, run: skeleton.Run, step: int) -> None:
        if self.lora:       # the run is an adapter folder whose weights are the journal's EMA file
            record = adapter_record(self.pipe, run.run_dir, weights_file=store.EMA_FILE)
            store.write_text_atomic(run.run_dir / ADAPTER_CONFIG, json.dumps(record, indent=2) + "\n")


@torch.no_grad()
def sample_grid(cfg: FinetuneConfig, pipe, ema_model: torch.nn.Module, path: Path) -> Path:
    """Rows of the EMA model's samples from one fixed noise: the instance prompt, the class prompt and the
    empty prompt (text models), and for a LoRA the base itself (lora_scale 0) below, so forgetting shows."""
    from diffusekit.seeding import derive_seed
    from diffusekit.viz import save_grid
    tc, n = cfg.train, cfg.train.num_sample_images
    grid = copy.copy(pipe)
    grid.model, grid.compiled, grid.graphed = ema_model, None, None
    prompts = [p for p in dict.fromkeys([cfg.instance_prompt, cfg.class_prompt, ""])] if pipe.has_text else [None]
    noise = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(derive_seed(tc.seed, "grid")))
    labels = -1 if pipe.num_classes else None
    scales = [None, 0.0] if cfg.method == "lora" else [None]
    rows = [grid.sample(n, tc.sample_sampler, tc.sample_steps, noise=noise, prompt=p, class_labels=labels,
                        lora_scale=s) for s in scales for p in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_grid(torch.cat(rows), path, nrow=n)


def finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             generate=None) -> FinetuneResult:
    """Fine-tune cfg.base on cfg.data into run_dir (see the module docstring).

    resume=True continues the checkpoint in run_dir exactly (refused when the base's weights changed);
    resume=False refuses a folder that holds one. generate(cfg, pipe): how class images are drawn
    (default finetune_data.draw_class_images; rank 0 calls it). Under torchrun each process calls this and
    rank 0 writes the run. The caller's RNG state is left as it was.
    """
    run_dir = Path(run_dir)
    with skeleton.processes(run_dir, cfg.data, cfg.train.device) as (dist, device):
        check_precision(cfg.train.precision, device)
        dist.check_split(cfg.train.batch_size)
        return _finetune(cfg, run_dir, resume, progress, dist, device, generate)


def _finetune(cfg: FinetuneConfig, run_dir: Path, resume: bool, progress: bool, dist: Dist, device,
              generate) -> FinetuneResult:
    pipe = open_base(cfg, device)
    base_sha256 = content_hash(base_state_dict(pipe))
    trainer = FinetuneTrainer(cfg, pipe, base_sha256)
    state = skeleton.open_run(trainer, run_dir, resume, dist, run_dir)
    if state is not None:
        saved = store.read_weights(run_dir / store.RAW_FILE)[1].get(BASE_HASH_KEY, base_sha256)
        check_base(pipe, cfg.base, run_dir, {"base": {"sha256": saved}})
    if dist.rank == 0:
        store.write_text_atomic(run_dir / FINETUNE_FILE, cfg.to_json() + "\n")
        if not trainer.lora:
            copy_autoencoder(Path(cfg.base), run_dir)
    images, prompts = instance_images(cfg, pipe)
    classes = class_images(cfg, pipe, run_dir, base_sha256, generate, dist) if cfg.prior else None
    run = skeleton.build(trainer, run_dir, dist, device, run_dir, state)
    trainer.inputs = FinetuneInputs(cfg, pipe, images, prompts, classes, device, dist)
    run.batches_per_epoch = trainer.inputs.batches_per_epoch
    skeleton.fit(trainer, run, progress)
    return FinetuneResult(run_dir, max(run.start, cfg.train.steps), run.last_loss, run.elapsed(), cfg.method)


def copy_autoencoder(base: Path, run_dir: Path) -> None:
    """A full fine-tune of a latent base is a plain latent run: it holds its autoencoder (RUN/autoencoder), a copy of
    the base's, as `train` keeps one (Pipeline.load reads it there)."""
    if (base / "autoencoder").is_dir() and not (run_dir / "autoencoder").exists():
        shutil.copytree(base / "autoencoder", run_dir / "autoencoder",
                        ignore=shutil.ignore_patterns("ckpt.*", ".lock", "*.tmp"))


# ---------------------------------------------------------------------------------------------
# what `diffusekit finetune` calls


@dataclass
class FinetunePlan:
    run_dir: Path
    config: FinetuneConfig
    resume: bool
    finished: bool = False

    def run(self, progress: bool = True, generate=None) -> FinetuneResult:
        return finetune(self.config, self.run_dir, resume=self.resume, progress=progress, generate=generate)


def finetune_config(base: str | Path, data: str | Path, options: dict[str, Any] | None = None,
                    saved: FinetuneConfig | None = None) -> FinetuneConfig:
    """A FinetuneConfig from options: top-level fields ("method", "instance_prompt", ...), "train.x" and
    "adapter.x" (dotted), on top of `saved` (a run being resumed) or the defaults."""
    cfg = saved or FinetuneConfig(base=str(base), data=str(data))
    top, sections = {}, {"train": {}, "adapter": {}}
    for key, value in (options or {}).items():
        section, dot, name = key.partition(".")
        if dot and section not in sections:
            raise ConfigError(f"option {key!r}: the sections are train and adapter.")
        (sections[section] if dot else top)[name if dot else key] = value
    d = cfg.to_dict()
    d.update({"base": str(base), "data": str(data), **top})
    d["train"] = {**d["train"], **sections["train"]}
    d["adapter"] = {**d["adapter"], **sections["adapter"]}
    return FinetuneConfig.from_dict(d)


def plan_finetune(base: str | Path, data: str | Path, out_dir: str | Path, options: dict[str, Any] | None = None,
                  *, resume: bool = False, overwrite: bool = False, dry_run: bool = False) -> FinetunePlan:
    """The fine-tune `diffusekit finetune` would run in out_dir, checked; `overwrite` clears what diffusekit
    wrote there (not on dry_run; under torchrun rank 0 clears it, before any rank joins the process group)."""
    from diffusekit.store.manifest import check_apart, clear_run
    from diffusekit.training.plan import check_resume_length
    run_dir = Path(out_dir)
    if overwrite and resume:
        raise ConfigError("--overwrite starts afresh and --resume continues; give one of them.")
    base_kind(base)
    saved = read_finetune_config(run_dir) if resume and (run_dir / FINETUNE_FILE).exists() else None
    cfg = finetune_config(base, data, options, saved)
    changed = {k: v for k, v in saved.diff(cfg).items() if k not in FINETUNE_RESUMABLE} if saved else {}
    if changed:
        lines = "; ".join(f"{k}: the run has {a!r}, the command line says {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume keeps the fine-tune's settings, but {lines}. Drop those options, or start a new "
                          "run with another --out.")
    check_apart(run_dir, cfg.data)
    if dry_run:
        return FinetunePlan(run_dir, cfg, resume)
    if overwrite and rank_world()[0] == 0:
        clear_run(run_dir)
    finished = resume and check_resume_length(run_dir, "latest", cfg.train.steps)
    return FinetunePlan(run_dir, cfg, resume, finished)


__all__ = ["FinetuneConfig", "FinetunePlan", "FinetuneResult", "base_kind", "finetune", "finetune_config",
           "plan_finetune"]
