"""The step loop every trainer runs: per-step seeds, learning rate, divergence stop, progress.

Each trainer (diffusion, autoencoder, classifier) supplies a step function that `run_loop` runs:
the loop seeds each step from (seed, step, rank), sets the learning rate, calls the step, stops on
a non-finite loss or gradient, keeps a progress bar with smoothed values and hands the step's
numbers to the skeleton's hooks (logging, grids, evaluation, checkpoints; training.skeleton).

Reproducibility: every random draw of step s comes from a seed derived from (seed, s, rank), never
from a generator carried across steps, so resuming needs only weights, EMA and optimizer state.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from diffusekit.config import ConfigError
from diffusekit.progress import bar as progress_bar
from diffusekit.seeding import derive_seed
from diffusekit.training.processes import Dist


def lr_at(cfg, step: int) -> float:
    """Learning rate of update `step` (0-based) for a config with lr, warmup_steps, lr_schedule, steps:
    linear warm-up, then constant or cosine to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    # lr = lr_max * (1 + cos(pi * progress)) / 2   (Loshchilov & Hutter 2017, SGDR eq. 5, no restarts)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# the step loop


class TrainingDiverged(ConfigError):
    """The loss or gradient norm became NaN or infinite; the message names the step and last checkpoint."""

    def __init__(self, step: int, what: str, value: float, run_dir: Path | None, saved_step: int | None):
        self.step, self.saved_step = step, saved_step
        self.checkpoint = run_dir if saved_step is not None else None
        where = (f"the last good checkpoint is {run_dir} (step {saved_step}) and was kept"
                 if saved_step is not None else "no checkpoint had been saved yet")
        super().__init__(f"training diverged: {what} is {value} at step {step}; {where}. Lower --lr, "
                         f"raise the warm-up or set grad_clip > 0, and start a new run.")


class NonFinite(Exception):
    """Raised inside a step when a number that must be finite is not; run_loop reports the step."""

    def __init__(self, what: str, value: float):
        super().__init__(what)
        self.what, self.value = what, value


def check_loss(loss_value: float) -> None:
    """Refuse a non-finite loss before it reaches the weights (run_loop names the step)."""
    if not math.isfinite(loss_value):
        raise NonFinite("the loss", loss_value)


def clip_and_step(model: torch.nn.Module, opt, scaler, grad_clip: float) -> float:
    """Unscale (fp16), clip and step after the backward passes; returns the gradient norm.

    Refuses a non-finite gradient before stepping (without a scaler; with one, the scaler skips such
    steps and lowers its scale, as AMP intends).
    """
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf).item()
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        raise NonFinite("the gradient norm", grad_norm)
    scaler.step(opt)
    scaler.update()
    return grad_norm


def run_loop(step_fn: Callable[[int, torch.Generator], dict], *, start: int, total: int, seed: int,
             dist: Dist, device: torch.device, opt=None, lr_config=None,
             on_step: Callable[[int, dict], None] | None = None, last_checkpoint: Callable[[], tuple] = lambda: (None, None),
             progress: bool = True, desc: str = "train") -> None:
    """Run step_fn for steps start..total-1 with per-step seeding, lr, divergence stop and a progress bar.

    step_fn(step, generator) -> {"loss": float, ...}; on_step(step + 1, numbers) runs after each step;
    last_checkpoint() -> (run_dir, step) names the checkpoint a divergence message points to.
    """
    bar = progress_bar(total=total, initial=start, show=progress and dist.rank == 0, desc=desc, unit="step",
                       dynamic_ncols=True)
    smooth: dict[str, float] = {}
    try:
        for step in range(start, total):
            g = torch.Generator(device).manual_seed(derive_seed(seed, "step", step, dist.rank))
            torch.manual_seed(derive_seed(seed, "global", step, dist.rank))     # dropout layers
            lr = lr_at(lr_config, step) if lr_config is not None else None
            for group in (opt.param_groups if opt is not None and lr is not None else ()):
                group["lr"] = lr
            try:
                numbers = step_fn(step, g)
            except NonFinite as e:
                raise TrainingDiverged(step + 1, e.what, e.value, *last_checkpoint()) from None
            if lr is not None:
                numbers["lr"] = lr
            for key in ("loss", "acc"):
                if key in numbers:
                    # exponential smoothing for the bar only (the logs keep raw window means)
                    smooth[key] = numbers[key] if key not in smooth else 0.98 * smooth[key] + 0.02 * numbers[key]
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in smooth.items()}, refresh=False)
            if on_step is not None:
                on_step(step + 1, numbers)
    finally:
        bar.close()
