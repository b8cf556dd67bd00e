"""Training: the diffusion loss and its weighting, EMA, the optimisation loop, exact resume, torchrun.

`train(run_config, out_dir)` is the public entry point; `python -m diffusekit.train --config
run.json --out DIR [--resume]` wraps it. The step function orchestrates `diffusion_loss`, an AdamW
step and an `EMA` update; the shared loop (diffusekit.loop) seeds, schedules the learning rate and
stops on divergence; hooks write metrics, sample grids and checkpoints (diffusekit.checkpoint).

Reproducibility: every random draw of step s (data order, timesteps, noise, label dropout,
augmentation, dropout layers) comes from a seed derived from (seed, s, rank), never from
a generator carried across steps. Resuming therefore needs no RNG state, only the weights, the
EMA and the optimizer state, and on the CPU a resumed run equals an uninterrupted one bit for bit.

Multi-process (torchrun): batch_size is the GLOBAL batch; each of the world_size ranks takes its
own batch_size / world_size slice of it, so results do not depend on how many processes share
the work (up to floating-point reduction order). Rank 0 writes checkpoints, metrics and grids.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusekit import store as ckpt
from diffusekit.config import ConfigError
from diffusekit.data import open_dataset
from diffusekit.device import autocast, grad_scaler, rank_world
from diffusekit.fastpath import compile_wanted, maybe_compile
from diffusekit.loop import EMA, Dist, check_loss, clip_and_step, run_loop, setup_processes
from diffusekit.seeding import derive_seed
from diffusekit.losses import diffusion_loss
from diffusekit.models import build_model
from diffusekit.train_inputs import StepInputs, micro_batches, slice_cond
from diffusekit.run import (RESUMABLE_CHANGES, RunConfig, check_data_fits, read_config_file, read_run_config,
                            resume_conflicts, weights_metadata)
from diffusekit.schedule import NoiseSchedule
from diffusekit.model_card import write_model_card
from diffusekit.tracking import RunEvaluator, SampleGrid, Tracker, grid_pipeline, reference_images
from diffusekit.viz import plot_loss

# --- the loop ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `train` returns: where the run is, how far it got, and the trained models."""
    run_dir: Path
    step: int
    loss: float | None            # mean loss of the last logging window
    seconds: float                # training time, including before a resume
    model: torch.nn.Module        # raw weights
    ema_model: torch.nn.Module    # EMA weights (what sampling uses)


class _Hooks:
    """After each step: the logging window, metrics.jsonl, sample grids and checkpoints (rank 0 writes)."""

    def __init__(self, cfg: RunConfig, save, grid, tracker, evaluate, start_step: int, elapsed_before: float):
        self.cfg, self.save_fn, self.grid, self.tracker, self.evaluate = cfg, save, grid, tracker, evaluate
        self.window_loss, self.window_steps, self.last_loss = 0.0, 0, None
        self.saved_step, self.elapsed_before = (start_step if start_step > 0 else None), elapsed_before
        self.t_start = self.t_window = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def __call__(self, step: int, numbers: dict) -> None:
        tc = self.cfg.train
        self.window_loss, self.window_steps = self.window_loss + numbers["loss"], self.window_steps + 1
        last = step == tc.steps
        if step % tc.log_every == 0 or last:
            now = time.time()
            self.last_loss = self.window_loss / self.window_steps
            if self.tracker is not None:
                self.tracker.log(step, {"loss": self.last_loss, "lr": numbers["lr"], "grad_norm": numbers["grad_norm"],
                                        "time": self.elapsed(), "images_per_s":
                                        self.window_steps * tc.batch_size / max(now - self.t_window, 1e-9)})
            self.window_loss, self.window_steps, self.t_window = 0.0, 0, now
        if self.grid is not None and (step % tc.sample_every == 0 or last):
            self.tracker.image(step, self.grid(step))
        if self.evaluate is not None and (step % tc.eval_every == 0 or last):
            self.tracker.log(step, self.evaluate())
        if step % tc.save_every == 0 or last:
            self.save_fn(step, self.elapsed())
            self.saved_step = step


def train(run_config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          dataset=None, resume_from: str | int | None = None) -> TrainResult:
    """Train the run's UNet on its data and write the run directory `out_dir` (see DESIGN.md).

    resume=True continues the checkpoint in out_dir (exactly, on the CPU) and starts fresh if there
    is none; resume=False refuses a folder that already holds a checkpoint. Under torchrun each
    process calls this; rank 0 writes the files. Raises TrainingDiverged on a NaN/inf loss.
    dataset: the data already opened for run_config.data (else it is opened here). resume_from:
    "latest" (default), a step of the run's checkpoint-STEP/ folders, or a checkpoint folder.
    The caller's global RNG state is left as it was (the loop seeds inside torch.random.fork_rng).
    """
    dist, device = setup_processes(run_config.train.device)
    run_dir = Path(out_dir)
    try:
        devices = [device.index or 0] if device.type == "cuda" else []
        if dist.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        # one writer per run: rank 0 holds the run's lock for the whole training (readers never write)
        with torch.random.fork_rng(devices=devices), (ckpt.RunLock(run_dir) if dist.rank == 0 else nullcontext()):
            return _train(run_config, run_dir, resume, progress, dist, device, dataset, resume_from)
    finally:
        dist.close()


def _open_run(cfg: RunConfig, run_dir: Path, resume: bool, dist: Dist, folder: Path) -> dict | None:
    """Check the run folder against resume/config; returns the trainer state to resume from (read from
    `folder`: the run, or one of its checkpoint-STEP/ folders), or None."""
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.recover(run_dir)
    dist.barrier()
    if not (run_dir / ckpt.STATE_FILE).exists():
        return None
    if not resume:
        step = ckpt.read_trainer_state(run_dir, finish_interrupted=False)["step"]
        raise ckpt.CheckpointError(f"{run_dir} already holds a checkpoint at step {step}; pass resume=True "
                                   f"(--resume) to continue it, or choose a new output folder.")
    diff = resume_conflicts(read_run_config(folder), cfg)
    if diff:
        lines = "\n  ".join(f"{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {run_dir} with a different config; these fields differ:\n  {lines}\n"
                          f"Use the checkpoint's {ckpt.CONFIG_FILE}, or start a new run (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change on resume).")
    return ckpt.read_trainer_state(folder, finish_interrupted=False)


def _same_checkpoint_everywhere(dist: Dist, run_dir: Path, state: dict | None) -> None:
    """Every rank resumes from the same step: a run folder that only some nodes see would mix steps silently."""
    if dist.world_size == 1:
        return
    steps = [None] * dist.world_size
    torch.distributed.all_gather_object(steps, None if state is None else state["step"])
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {r}: {'no checkpoint' if s is None else f'step {s}'}" for r, s in enumerate(steps))
        raise ckpt.CheckpointError(f"the processes see different checkpoints in {run_dir} ({seen}); every node "
                                   f"must read the same run directory: put --out on a file system all nodes share, "
                                   f"or copy the run to the same path on every node before resuming.")


def _build(cfg: RunConfig, device: torch.device, folder: Path, state: dict | None):
    """Model, EMA and optimizer, identical on every rank; restored from the checkpoint when resuming."""
    tc = cfg.train
    torch.manual_seed(derive_seed(tc.seed, "init"))
    model = build_model(cfg).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, elapsed = 0, 0.0
    if state is not None:
        ckpt.load_state_dict_checked(model, ckpt.read_weights(folder / ckpt.RAW_FILE)[0], str(folder))
        ckpt.load_state_dict_checked(ema.model, ckpt.read_weights(folder / ckpt.EMA_FILE)[0], str(folder))
        opt.load_state_dict(state["optimizer"])
        ema.num_updates, step, elapsed = state["ema_num_updates"], state["step"], state["elapsed"]
    return model, ema, opt, step, elapsed


def _autoencoder(cfg: RunConfig, run_dir: Path, device: torch.device, rank0: bool):
    """A latent run's frozen autoencoder, copied into RUN/autoencoder (the run records what it encodes with)."""
    if cfg.latent is None:
        return None, ""
    import shutil

    from diffusekit.autoencoder_train import autoencoder_fingerprint, load_autoencoder
    copy = run_dir / "autoencoder"
    if rank0 and not copy.exists():
        shutil.copytree(cfg.latent.autoencoder, copy, ignore=shutil.ignore_patterns("ckpt.*", ".lock", "*.tmp"))
    return load_autoencoder(copy, device=device), autoencoder_fingerprint(copy)


def _saver(cfg: RunConfig, run_dir: Path, dist: Dist, model, ema, opt, inputs):
    """save(step, elapsed): the checkpoint (rank 0), its checkpoint-STEP/ snapshot, the loss plot, the model card."""
    tc, rank0 = cfg.train, dist.rank == 0

    def save(step: int, elapsed: float) -> None:
        if rank0:
            trainer_state = {"optimizer": opt.state_dict(), "ema_num_updates": ema.num_updates,
                             "elapsed": elapsed, "seed": tc.seed, "world_size": dist.world_size,
                             "data_order": {"epoch": step // inputs.batches_per_epoch,
                                            "batches_per_epoch": inputs.batches_per_epoch}}
            ckpt.save_checkpoint(run_dir, step, ema=ema.model.state_dict(), raw=model.state_dict(),
                                 trainer_state=trainer_state, config_json=cfg.to_json() + "\n",
                                 metadata=weights_metadata(cfg))
            # checkpoint-STEP/ (hard links to the files just saved), the newest checkpoints_total_limit kept
            ckpt.snapshot_checkpoint(run_dir, step, tc.checkpoints_total_limit)
            if (run_dir / "metrics.jsonl").stat().st_size:    # a loss picture once something is logged
                plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
            write_model_card(run_dir, cfg, step)
        dist.barrier()
    return save


def _observers(cfg: RunConfig, run_dir: Path, schedule, device, autoencoder, dataset, ema, start: int):
    """Rank 0's sample-grid writer, tracker (metrics.jsonl, TensorBoard) and evaluator; writes config.json."""
    tc, grid, evaluate = cfg.train, None, None
    if tc.sample_every:
        sampler_grid = SampleGrid(cfg, schedule, device, autoencoder, dataset)
        grid = lambda step: sampler_grid.save(ema.model, run_dir / "samples" / f"step_{step:06d}.png", tc.precision)  # noqa: E731
    if tc.eval_every:
        judge = RunEvaluator(reference_images(dataset), tc.eval_samples)
        evaluate = lambda: judge(grid_pipeline(cfg, schedule, ema.model, device, autoencoder))   # noqa: E731
    ckpt.write_text_atomic(run_dir / ckpt.CONFIG_FILE, cfg.to_json() + "\n")
    return grid, Tracker(run_dir, start, tc.report_to), evaluate


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, dist: Dist, device: torch.device,
           dataset, resume_from) -> TrainResult:
    tc, rank0 = cfg.train, dist.rank == 0
    dataset = dataset if dataset is not None else open_dataset(cfg.data)
    check_data_fits(cfg, dataset)
    use_labels = cfg.model.num_classes > 0
    cfg = RunConfig.from_dict({**cfg.to_dict(), "class_names": list(dataset.class_names) if use_labels else []})
    if tc.batch_size % (dist.world_size * tc.grad_accum):
        raise ConfigError(f"batch_size={tc.batch_size} is the global batch and must split evenly over "
                          f"{dist.world_size} process(es) x grad_accum={tc.grad_accum} micro-batches; use a "
                          f"multiple of {dist.world_size * tc.grad_accum}.")
    folder = ckpt.resume_folder(run_dir, resume_from) if resume else run_dir
    state = _open_run(cfg, run_dir, resume, dist, folder)
    _same_checkpoint_everywhere(dist, run_dir, state)
    model, ema, opt, start, elapsed_before = _build(cfg, device, folder, state)
    ddp = dist.world_size > 1
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if ddp else model
    call = _training_call(net, tc, device, start, dist)
    schedule = NoiseSchedule.from_config(cfg.schedule)
    autoencoder, ae_fingerprint = _autoencoder(cfg, run_dir, device, rank0)
    inputs = StepInputs(cfg, dataset, schedule, dist, device, autoencoder, ae_fingerprint, run_dir, progress and rank0)
    scaler = grad_scaler(device, tc.precision)

    def step_fn(step: int, g: torch.Generator) -> dict:
        # one optimisation step on this rank's slice of the global batch, in grad_accum micro-batches
        x0, t, noise, cond = inputs(step)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for k, sl in enumerate(micro_batches(len(x0), tc.grad_accum)):
            last = k == tc.grad_accum - 1
            with (net.no_sync() if ddp and not last else nullcontext()), autocast(device, tc.precision), \
                    inputs.dropout_masks(step, sl):
                loss = diffusion_loss(call, schedule, x0[sl], cfg.model.prediction_type, None, tc.loss_weighting,
                                      tc.min_snr_gamma, t=t[sl], noise=noise[sl], **slice_cond(cond, sl))
                loss = loss / tc.grad_accum       # the mean over the rank's slice
            check_loss(loss.item())
            scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = dist.mean(total)
        check_loss(loss_value)
        grad_norm = clip_and_step(model, opt, scaler, tc.grad_clip)
        ema.update(model)
        return {"loss": loss_value, "grad_norm": grad_norm}

    save = _saver(cfg, run_dir, dist, model, ema, opt, inputs)

    grid, tracker, evaluate = _observers(cfg, run_dir, schedule, device, autoencoder, dataset, ema, start) \
        if rank0 else (None, None, None)
    hooks = _Hooks(cfg, save, grid, tracker, evaluate, start, elapsed_before)
    model.train()
    try:
        run_loop(step_fn, start=start, total=tc.steps, seed=tc.seed, dist=dist, device=device, opt=opt,
                 lr_config=tc, on_step=hooks, last_checkpoint=lambda: (run_dir, hooks.saved_step),
                 progress=progress, desc="train")
    finally:
        inputs.close()
        if tracker is not None:
            tracker.close()
    return TrainResult(run_dir, max(start, tc.steps), hooks.last_loss, hooks.elapsed(), model, ema.model)


def _training_call(net, tc, device: torch.device, start: int, dist: Dist):
    """The training forward, compiled where it pays (fastpath.should_compile) or on request; DDP hooks stay on net."""
    micro_batch = tc.batch_size // dist.world_size // tc.grad_accum
    return maybe_compile(net, compile_wanted(tc.compile, device, (tc.steps - start) * tc.grad_accum, training=True,
                                             batch_size=micro_batch))


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusekit.train --config run.json --out DIR [--resume]` (the torchrun entry point)."""
    p = argparse.ArgumentParser(prog="python -m diffusekit.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="a RunConfig JSON file (e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    r = train(read_config_file(args.config), args.out, resume=args.resume, progress=not args.no_progress)
    if rank_world()[0] == 0:
        print(f"trained to step {r.step} in {r.seconds:.1f} s; loss {r.loss}; run in {r.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
