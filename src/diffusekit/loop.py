"""What every training loop shares: seeds, data order, learning rate, EMA, processes, progress, divergence.

The diffusion trainer (train.py) and the classifier trainer (classifier_train.py) are each a step
function run by `run_loop`: the loop seeds each step from (seed, step, rank), sets the learning
rate, calls the step, stops on a non-finite loss or gradient, keeps a progress bar with smoothed
values and hands the step's numbers to the caller's hook (logging, grids, checkpoints).

Reproducibility: every random draw of step s comes from a seed derived from (seed, s, rank), never
from a generator carried across steps, so resuming needs only weights, EMA and optimizer state.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .store import write_text_atomic
from .config import ConfigError
from .device import rank_world, resolve_device
from .seeding import derive_seed


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


class EMA:
    """Exponential moving average of a model's parameters, held in a frozen copy of the model."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        n = self.num_updates
        # warm-up: decay_n = min(decay, (1 + n) / (10 + n))   (as in TF's ExponentialMovingAverage)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            # ema = d * ema + (1 - d) * p
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1


class MetricsLog:
    """metrics.jsonl: one JSON record per logging step; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = []
        if start_step > 0 and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")



# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it)."""
    rank: int = 0
    world_size: int = 1
    created: bool = False         # whether we initialised the process group (and must destroy it)

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (the local value without torchrun)."""
        value = value.detach().clone().float()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value.item()

    def close(self):
        if self.created:
            torch.distributed.destroy_process_group()


def setup_processes(device: str = "auto") -> tuple[Dist, torch.device]:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (nccl on CUDA, else gloo)."""
    rank, world, local_rank = rank_world()
    device = resolve_device(device)
    if world <= 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), created), device


# ---------------------------------------------------------------------------------------------
# the loop skeleton


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
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=not (progress and dist.rank == 0), desc=desc, unit="step",
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
