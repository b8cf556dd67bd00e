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
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusekit import checkpoint as ckpt
from diffusekit.config import ConfigError
from diffusekit.data import ImageDataset, load_dataset
from diffusekit.device import autocast, grad_scaler, rank_world
from diffusekit.loop import EMA, DataOrder, Dist, MetricsLog, derive_seed, optimizer_step, run_loop, setup_processes
from diffusekit.nn.unet import UNet
from diffusekit.run import (RESUMABLE_CHANGES, RunConfig, check_data_fits, read_config_file, read_run_config,
                            resume_conflicts, weights_metadata)
from diffusekit.schedule import NoiseSchedule
from diffusekit.viz import plot_loss, save_grid

# --- the loss ------------------------------------------------------------------------------


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str, weighting: str = "none",
                 min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights (B,) float64 of the MSE on the prediction_type target."""
    if weighting == "none":
        return torch.ones(t.shape, dtype=torch.float64)
    if weighting != "min_snr":
        raise ConfigError(f"loss weighting {weighting!r}; choose 'none' or 'min_snr'.")
    snr = schedule.snr[t.cpu().long()]
    clipped = snr.clamp(max=min_snr_gamma)
    # min-SNR-gamma, Hang et al. 2023, eq. 9 and sec. 3.4: the x0-loss weight min(SNR, gamma)
    # divided by how the target's MSE scales to the x0 MSE (SNR for eps, SNR + 1 for v)
    if prediction_type == "epsilon":
        # at SNR = 0 (zero terminal SNR) the limit of min(SNR, gamma) / SNR is 1
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-300), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, prediction_type: str,
                   generator: torch.Generator | None, weighting: str = "none", min_snr_gamma: float = 5.0,
                   **cond) -> torch.Tensor:
    """The denoising loss: one random timestep per image, MSE to the target, optional min-SNR weights.

    x0: (B, C, H, W). Draws t ~ U{0..T-1} and eps ~ N(0, I) from `generator` (on x0's device).
    Returns a scalar float32: mean_i w_i * mean_pixels (model(x_t, t) - target)^2   (DDPM eq. 14).
    """
    B = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(prediction_type, x0, noise, t)
    prediction = model(x_t, t, **cond).float()
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").flatten(1).mean(1)   # (B,)
    w = loss_weights(schedule, t, prediction_type, weighting, min_snr_gamma).to(per_sample)
    return (w * per_sample).mean()


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


class _SampleGrid:
    """Sample a fixed set of noise images (and classes) with the EMA model and save a grid."""

    def __init__(self, cfg: RunConfig, schedule: NoiseSchedule, device: torch.device):
        from diffusekit.samplers import get_sampler
        tc, m = cfg.train, cfg.model
        g = torch.Generator().manual_seed(derive_seed(tc.seed, "grid"))
        n = tc.num_sample_images
        self.x_T = torch.randn((n, m.in_channels, m.image_size, m.image_size), generator=g).to(device)
        self.cond = {"class_labels": (torch.arange(n) % m.num_classes).to(device)} if m.num_classes else {}
        self.nrow = m.num_classes if 0 < m.num_classes <= 16 else math.ceil(math.sqrt(n))
        self.sampler = get_sampler(tc.sample_sampler, schedule, prediction_type=m.prediction_type)
        self.num_steps, self.seed, self.device = tc.sample_steps, tc.seed, device

    @torch.no_grad()
    def save(self, ema_model: torch.nn.Module, path: Path, precision: str) -> Path:
        g = torch.Generator(self.device).manual_seed(derive_seed(self.seed, "grid-sampler"))
        with autocast(self.device, precision):
            x = self.sampler.sample(ema_model, self.x_T, num_steps=self.num_steps, generator=g, **self.cond)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(x.float().clamp(-1, 1).cpu(), path, nrow=self.nrow)


class _Hooks:
    """After each step: the logging window, metrics.jsonl, sample grids and checkpoints (rank 0 writes)."""

    def __init__(self, cfg: RunConfig, save, grid, metrics, start_step: int, elapsed_before: float):
        self.cfg, self.save_fn, self.grid, self.metrics = cfg, save, grid, metrics
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
            if self.metrics is not None:
                self.metrics.write({"step": step, "loss": self.last_loss, "lr": numbers["lr"],
                                    "grad_norm": numbers["grad_norm"], "time": self.elapsed(),
                                    "images_per_s": self.window_steps * tc.batch_size / max(now - self.t_window, 1e-9)})
            self.window_loss, self.window_steps, self.t_window = 0.0, 0, now
        if self.grid is not None and (step % tc.sample_every == 0 or last):
            self.grid(step)
        if step % tc.save_every == 0 or last:
            self.save_fn(step, self.elapsed())
            self.saved_step = step


def train(run_config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          dataset: ImageDataset | None = None) -> TrainResult:
    """Train the run's UNet on its data and write the run directory `out_dir` (see DESIGN.md).

    resume=True continues the checkpoint in out_dir (exactly, on the CPU) and starts fresh if there
    is none; resume=False refuses a folder that already holds a checkpoint. Under torchrun each
    process calls this; rank 0 writes the files. Raises TrainingDiverged on a NaN/inf loss.
    dataset: the data already loaded for run_config.data (else it is loaded here).
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
            return _train(run_config, run_dir, resume, progress, dist, device, dataset)
    finally:
        dist.close()


def _open_run(cfg: RunConfig, run_dir: Path, resume: bool, dist: Dist) -> dict | None:
    """Check the run folder against resume/config; returns the trainer state to resume from, or None."""
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
    diff = resume_conflicts(read_run_config(run_dir), cfg)
    if diff:
        lines = "\n  ".join(f"{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {run_dir} with a different config; these fields differ:\n  {lines}\n"
                          f"Use the checkpoint's {ckpt.CONFIG_FILE}, or start a new run (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change on resume).")
    return ckpt.read_trainer_state(run_dir, finish_interrupted=False)


def _build(cfg: RunConfig, device: torch.device, run_dir: Path, state: dict | None):
    """Model, EMA and optimizer, identical on every rank; restored from the checkpoint when resuming."""
    tc = cfg.train
    torch.manual_seed(derive_seed(tc.seed, "init"))
    model = UNet(cfg.model).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, elapsed = 0, 0.0
    if state is not None:
        ckpt.load_state_dict_checked(model, ckpt.read_weights(run_dir / ckpt.RAW_FILE)[0], str(run_dir))
        ckpt.load_state_dict_checked(ema.model, ckpt.read_weights(run_dir / ckpt.EMA_FILE)[0], str(run_dir))
        opt.load_state_dict(state["optimizer"])
        ema.num_updates, step, elapsed = state["ema_num_updates"], state["step"], state["elapsed"]
    return model, ema, opt, step, elapsed


def _class_condition(labels, idx, class_dropout: float, g: torch.Generator) -> dict:
    if labels is None:
        return {}
    y = labels[idx]
    if class_dropout > 0:
        # label -> null class with prob. class_dropout (classifier-free guidance, Ho & Salimans 2022)
        drop = torch.rand(y.shape, generator=g, device=g.device).to(y.device) < class_dropout
        y = torch.where(drop, torch.full_like(y, -1), y)
    return {"class_labels": y}


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, dist: Dist, device: torch.device,
           dataset: ImageDataset | None) -> TrainResult:
    tc, rank0 = cfg.train, dist.rank == 0
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    check_data_fits(cfg, dataset)
    use_labels = cfg.model.num_classes > 0
    cfg = RunConfig.from_dict({**cfg.to_dict(), "class_names": list(dataset.class_names) if use_labels else []})
    if tc.batch_size % dist.world_size:
        raise ConfigError(f"batch_size={tc.batch_size} is the global batch and must split evenly over "
                          f"{dist.world_size} processes; use a multiple of {dist.world_size}.")
    state = _open_run(cfg, run_dir, resume, dist)
    model, ema, opt, start, elapsed_before = _build(cfg, device, run_dir, state)
    net = model if dist.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    schedule = NoiseSchedule.from_config(cfg.schedule)
    images = dataset.images.to(device)
    labels = dataset.labels.to(device) if use_labels else None
    order, per_rank = DataOrder(len(dataset), tc.batch_size, tc.seed), tc.batch_size // dist.world_size
    scaler = grad_scaler(device, tc.precision)

    def step_fn(step: int, g: torch.Generator) -> dict:
        # one optimisation step on this rank's slice of the global batch; all randomness from g
        idx = order.batch(step)[dist.rank * per_rank:(dist.rank + 1) * per_rank].to(device)
        x0 = dataset.augment(images[idx], g)
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with autocast(device, tc.precision):
            loss = diffusion_loss(net, schedule, x0, cfg.model.prediction_type, g, tc.loss_weighting,
                                  tc.min_snr_gamma, **_class_condition(labels, idx, tc.class_dropout, g))
        loss_value = dist.mean(loss)
        grad_norm = optimizer_step(loss, loss_value, model, opt, scaler, tc.grad_clip)
        ema.update(model)
        return {"loss": loss_value, "grad_norm": grad_norm}

    def save(step: int, elapsed: float) -> None:
        if rank0:
            trainer_state = {"optimizer": opt.state_dict(), "ema_num_updates": ema.num_updates,
                             "elapsed": elapsed, "seed": tc.seed, "world_size": dist.world_size,
                             "data_order": {"epoch": step // order.batches_per_epoch,
                                            "batches_per_epoch": order.batches_per_epoch}}
            ckpt.save_checkpoint(run_dir, step, ema=ema.model.state_dict(), raw=model.state_dict(),
                                 trainer_state=trainer_state, config_json=cfg.to_json() + "\n",
                                 metadata=weights_metadata(cfg))
            if (run_dir / "metrics.jsonl").stat().st_size:    # a loss picture once something is logged
                plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        dist.barrier()

    grid = None
    if rank0 and tc.sample_every:
        sampler_grid = _SampleGrid(cfg, schedule, device)
        grid = lambda step: sampler_grid.save(ema.model, run_dir / "samples" / f"step_{step:06d}.png", tc.precision)
    metrics = MetricsLog(run_dir / "metrics.jsonl", start) if rank0 else None
    if rank0:
        ckpt.write_text_atomic(run_dir / ckpt.CONFIG_FILE, cfg.to_json() + "\n")
    hooks = _Hooks(cfg, save, grid, metrics, start, elapsed_before)
    model.train()
    run_loop(step_fn, start=start, total=tc.steps, seed=tc.seed, dist=dist, device=device, opt=opt,
             lr_config=tc, on_step=hooks, last_checkpoint=lambda: (run_dir, hooks.saved_step),
             progress=progress, desc="train")
    return TrainResult(run_dir, max(start, tc.steps), hooks.last_loss, hooks.elapsed(), model, ema.model)


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
