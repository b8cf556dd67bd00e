"""The diffusion trainer: the UNet's denoising loss on the training skeleton, exact resume, torchrun.

`train(run_config, run_dir)` is the public entry point (`python -m diffusekit.train` wraps it for
torchrun). The step orchestrates `diffusion_loss` (training.losses) over the inputs of the step
(training.inputs), an AdamW step and an EMA update; the skeleton (training.skeleton) opens the run,
builds, loops, logs, draws sample grids (training.samples) and saves through the journal.

Reproducibility: every random draw of step s (data order, timesteps, noise, label dropout,
augmentation, dropout layers) comes from a seed derived from (seed, s, rank), never from
a generator carried across steps. Resuming therefore needs no RNG state, only the weights, the
EMA and the optimizer state, and on the CPU a resumed run equals an uninterrupted one bit for bit.

Multi-process (torchrun): batch_size is the GLOBAL batch; each of the world_size ranks takes its
own batch_size / world_size slice of it, so results do not depend on how many processes share
the work (up to floating-point reduction order). Rank 0 writes checkpoints, metrics and grids.
"""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusekit import store
from diffusekit.data import open_dataset
from diffusekit.device import autocast
from diffusekit.fastpath import compile_wanted, maybe_compile
from diffusekit.nn.network import build_model
from diffusekit.schedule import NoiseSchedule
from diffusekit.store.autoencoder import autoencoder_fingerprint, load_autoencoder
from diffusekit.store.run_config import (RESUMABLE_CHANGES, RunConfig, check_data_fits, read_run_config,
                                         weights_metadata)
from diffusekit.training import skeleton
from diffusekit.training.inputs import StepInputs, micro_batches, slice_cond
from diffusekit.training.loop import check_loss, clip_and_step
from diffusekit.training.losses import diffusion_loss
from diffusekit.training.model_card import write_model_card
from diffusekit.training.processes import Dist
from diffusekit.training.samples import RunEvaluator, SampleGrid, grid_pipeline, reference_images


@dataclass
class TrainResult:
    """What `train` returns: where the run is, how far it got, and the trained models."""
    run_dir: Path
    step: int
    loss: float | None            # mean loss of the last logging window
    seconds: float                # training time, including before a resume
    model: torch.nn.Module        # raw weights
    ema_model: torch.nn.Module    # EMA weights (what sampling uses)


def train(run_config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          dataset=None, resume_from: str | int | None = None) -> TrainResult:
    """Train the run's UNet on its data and write the run directory `run_dir` (see DESIGN.md).

    resume=True continues the checkpoint in run_dir (exactly, on the CPU) and starts fresh if there
    is none; resume=False refuses a folder that already holds a checkpoint. Under torchrun each
    process calls this; rank 0 writes the files. Raises TrainingDiverged on a NaN/inf loss.
    dataset: the data already opened for run_config.data (else it is opened here). resume_from:
    "latest" (default), a step of the run's checkpoint-STEP/ folders, or a checkpoint folder.
    The caller's global RNG state is left as it was (the loop seeds inside torch.random.fork_rng).
    """
    run_dir = Path(run_dir)
    with skeleton.processes(run_dir, run_config.data.source, run_config.train.device) as (dist, device):
        return _train(run_config, run_dir, resume, progress, dist, device, dataset, resume_from)


class DiffusionTrainer(skeleton.Trainer):
    """The UNet (with its text encoder) on the denoising loss of its schedule."""

    desc = "train"
    resumable = RESUMABLE_CHANGES

    def __init__(self, cfg: RunConfig, dataset, progress: bool):
        self.cfg, self.dataset, self.progress = cfg, dataset, progress
        self.schedule = NoiseSchedule.from_config(cfg.schedule)
        self.autoencoder, self.inputs = None, None

    def read_config(self, folder: Path) -> RunConfig:
        return read_run_config(folder)

    def make_model(self, device: torch.device) -> torch.nn.Module:
        model = build_model(self.cfg).to(device)
        return model.to(memory_format=torch.channels_last) if self.cfg.train.channels_last else model

    def metadata(self) -> dict[str, str]:
        return weights_metadata(self.cfg)

    def prepare(self, run: skeleton.Run) -> None:
        """The frozen autoencoder of a latent run and the step inputs (data order, noise, conditioning)."""
        self.autoencoder, fingerprint = _autoencoder(self.cfg, run.run_dir, run.device, run.rank0)
        self.inputs = StepInputs(self.cfg, self.dataset, self.schedule, run.dist, run.device, self.autoencoder,
                                 fingerprint, run.run_dir, self.progress and run.rank0)
        run.batches_per_epoch = self.inputs.batches_per_epoch

    def step_fn(self, run: skeleton.Run):
        return denoising_step(run, self.cfg.train, self.schedule, self.cfg.model.prediction_type, self.inputs)

    def periodic(self, run: skeleton.Run):
        """Rank 0's sample grids (samples/step_*.png) and FD/KID evaluations of the EMA model."""
        tc, hooks = self.cfg.train, []
        if tc.sample_every:
            grid = SampleGrid(self.cfg, self.schedule, run.device, self.autoencoder, self.dataset)

            def draw(step: int) -> None:
                path = run.run_dir / "samples" / f"step_{step:06d}.png"
                run.tracker.image(step, grid.save(run.ema.model, path, tc.precision))
            hooks.append((tc.sample_every, draw))
        if tc.eval_every:
            judge = RunEvaluator(reference_images(self.dataset), tc.eval_samples)

            def evaluate(step: int) -> None:
                pipe = grid_pipeline(self.cfg, self.schedule, run.ema.model, run.device, self.autoencoder,
                                     tc.precision)
                run.tracker.log(step, judge(pipe))
            hooks.append((tc.eval_every, evaluate))
        return hooks

    def after_save(self, run: skeleton.Run, step: int) -> None:
        write_model_card(run.run_dir, self.cfg, step)


def denoising_step(run: skeleton.Run, tc, schedule: NoiseSchedule, prediction_type: str, inputs):
    """step(step, generator) -> {"loss", "grad_norm"}: the denoising loss on inputs(step), an AdamW step, EMA.

    The one training step of every diffusion trainer (this one and training.finetune). inputs(step) returns
    this rank's (x0, t, noise, cond) or (x0, t, noise, cond, sample_weights), and has
    dropout_masks(step, slice); tc: a TrainConfig (grad_accum, precision, loss weighting, grad_clip, compile).
    """
    device, net = run.device, run.net
    ddp = net is not run.model                  # in DistributedDataParallel (skeleton.build): sync the last micro-batch
    call = _training_call(net, tc, device, run.start, run.dist)

    def step_fn(step: int, g: torch.Generator) -> dict:
        # one optimisation step on this rank's slice of the global batch, in grad_accum micro-batches
        x0, t, noise, cond, *rest = inputs(step)
        weights = rest[0] if rest else None
        run.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for k, sl in enumerate(micro_batches(len(x0), tc.grad_accum)):
            last = k == tc.grad_accum - 1
            with (net.no_sync() if ddp and not last else nullcontext()), autocast(device, tc.precision), \
                    inputs.dropout_masks(step, sl):
                loss = diffusion_loss(call, schedule, x0[sl], prediction_type, None, tc.loss_weighting,
                                      tc.min_snr_gamma, t=t[sl], noise=noise[sl],
                                      sample_weights=None if weights is None else weights[sl], **slice_cond(cond, sl))
                loss = loss / tc.grad_accum       # the mean over the rank's slice
            check_loss(loss.item())
            run.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = run.dist.mean(total)
        check_loss(loss_value)
        grad_norm = clip_and_step(run.model, run.opt, run.scaler, tc.grad_clip)
        run.ema.update(run.model)
        return {"loss": loss_value, "grad_norm": grad_norm}
    return step_fn


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, dist: Dist, device: torch.device,
           dataset, resume_from) -> TrainResult:
    tc = cfg.train
    dataset = dataset if dataset is not None else open_dataset(cfg.data)
    check_data_fits(cfg, dataset)
    use_labels = cfg.model.num_classes > 0
    cfg = RunConfig.from_dict({**cfg.to_dict(), "class_names": list(dataset.class_names) if use_labels else []})
    dist.check_split(tc.batch_size, tc.grad_accum)
    trainer = DiffusionTrainer(cfg, dataset, progress)
    folder = store.resume_folder(run_dir, resume_from) if resume else run_dir
    state = skeleton.open_run(trainer, run_dir, resume, dist, folder)
    run = skeleton.build(trainer, run_dir, dist, device, folder, state)
    trainer.prepare(run)
    try:
        skeleton.fit(trainer, run, progress)
    finally:
        trainer.inputs.close()
    return TrainResult(run_dir, max(run.start, tc.steps), run.last_loss, run.elapsed(), run.model, run.ema.model)


def _autoencoder(cfg: RunConfig, run_dir: Path, device: torch.device, rank0: bool):
    """A latent run's frozen autoencoder, copied into RUN/autoencoder (the run records what it encodes with)."""
    if cfg.latent is None:
        return None, ""
    copy = run_dir / "autoencoder"
    if rank0 and not copy.exists():
        shutil.copytree(cfg.latent.autoencoder, copy, ignore=shutil.ignore_patterns("ckpt.*", ".lock", "*.tmp"))
    return load_autoencoder(copy, device=device), autoencoder_fingerprint(copy)


def _training_call(net, tc, device: torch.device, start: int, dist: Dist):
    """The training forward, compiled where it pays (fastpath.should_compile) or on request; DDP hooks stay on net."""
    micro_batch = tc.batch_size // dist.world_size // tc.grad_accum
    return maybe_compile(net, compile_wanted(tc.compile, device, (tc.steps - start) * tc.grad_accum, training=True,
                                             batch_size=micro_batch))
