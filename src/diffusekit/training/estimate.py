"""How long a diffusion run will take on this device, measured before it starts.

`estimate_run_time(cfg)` builds the run's network (with its text encoder), its AdamW and EMA, and times
real optimisation steps of it (the trainer's own `denoising_step`: loss, backward, optimiser, EMA) on
synthetic inputs of the run's shape: one warm-up step, then the median of 3 timed steps. Data loading
(and a latent run's one-off encoding of the images) is not timed.

The measurement stays cheap: when three steps at the configured batch would take longer than
`budget_s` (a large layout on a CPU), the steps are timed at a batch of 8 and scaled to the configured
one (`measured_batch` says so): on a CPU the time of a step from batch 8 up grows in proportion to the
batch (measured: docs/BENCHMARKS.md, "32x32 colour on a CPU"), where at batch 1 or 2 fixed costs dominate.
Set DIFFUSEKIT_ESTIMATE=0 to skip it (`estimate_enabled`).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffusekit.device import resolve_device
from diffusekit.nn.layers import row_dropout_seeds
from diffusekit.nn.unet import UNetConfig
from diffusekit.schedule import NoiseSchedule
from diffusekit.store.run_config import default_preset
from diffusekit.training import skeleton
from diffusekit.training.diffusion import DiffusionTrainer, denoising_step
from diffusekit.training.losses import draw_t_noise
from diffusekit.training.processes import Dist

ENV = "DIFFUSEKIT_ESTIMATE"


@dataclass(frozen=True)
class RunEstimate:
    """Seconds per optimisation step of a run here, and for its remaining steps."""

    seconds_per_step: float
    steps: int                  # steps still to train
    batch_size: int             # the run's global batch
    measured_batch: int         # the batch the steps were timed at (scaled to batch_size when smaller)
    device: str

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_step * self.steps

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.seconds_per_step


def estimate_enabled() -> bool:
    """False when the environment asks to skip the measurement (DIFFUSEKIT_ESTIMATE=0)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _SyntheticInputs:
    """step -> (x0, t, noise, cond) of the run's shape at batch `batch`, like training.inputs.StepInputs."""

    def __init__(self, cfg, schedule: NoiseSchedule, batch: int, device: torch.device, captions=None):
        m, g = cfg.model, torch.Generator().manual_seed(0)
        self.x0 = (torch.rand(batch, m.in_channels, m.image_size, m.image_size, generator=g) * 2 - 1).to(device)
        self.t, self.noise = draw_t_noise(schedule, tuple(self.x0.shape), g, device, self.x0.dtype)
        self.cond = {}
        if m.num_classes:
            self.cond["class_labels"] = torch.randint(0, m.num_classes, (batch,), generator=g).to(device)
        if cfg.text is not None:
            captions = list(captions or ["a picture"])
            self.cond["prompts"] = [captions[i % len(captions)] for i in range(batch)]
        if cfg.train.channels_last:
            self.x0 = self.x0.contiguous(memory_format=torch.channels_last)

    def __call__(self, step: int):
        return self.x0, self.t, self.noise, self.cond

    def dropout_masks(self, step: int, sl: slice):
        return row_dropout_seeds(step, range(sl.start, sl.stop))


def _stepper(cfg, batch: int, device: torch.device, captions):
    """A timed step's function: the run's network, optimiser and EMA at `batch` (grad_accum kept only at full size)."""
    tc = cfg.train
    if batch != tc.batch_size:
        tc = replace(tc, batch_size=batch, grad_accum=1)
    cfg = replace(cfg, train=tc)
    trainer = DiffusionTrainer(cfg, None, progress=False)
    run = skeleton.build(trainer, Path("."), Dist(), device, Path("."), None)
    run.model.train()
    inputs = _SyntheticInputs(cfg, trainer.schedule, batch, device, captions)
    return denoising_step(run, tc, trainer.schedule, cfg.model.prediction_type, inputs)


def _timed(step_fn, step: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step_fn(step, torch.Generator().manual_seed(step))
    sync()
    return time.perf_counter() - start


def _batch_within(t_small: tuple[int, float], t_large: tuple[int, float], full: int, budget_s: float) -> int:
    """The largest batch up to `full` whose steps fit budget_s, by a line through two timed steps (batch, s)."""
    (b1, t1), (b2, t2) = t_small, t_large
    slope = (t2 - t1) / (b2 - b1) if b2 > b1 else 0.0
    if slope <= 0.0:                 # a noisy machine timed the larger batch no slower: assume proportional
        slope = t2 / b2
    fixed = max(t2 - slope * b2, 0.0)
    if fixed + slope * full <= budget_s:
        return full
    return max(1, min(full, int((budget_s - fixed) / slope)))


def estimate_run_time(cfg, *, start: int = 0, device: str | torch.device | None = None, repeats: int = 3,
                      budget_s: float = 3.0, captions=None) -> RunEstimate:
    """Time training steps of run config `cfg` here: after a warm-up step, the median of `repeats` steps;
    seconds per step at the configured batch and for the steps from `start` to cfg.train.steps.

    budget_s bounds the timed steps: where they would take longer at the configured batch, they run at a
    smaller one and the time is scaled up in proportion (an upper bound). captions: prompts for a text run
    (default: one fixed prompt). The caller's RNG state is left as it was."""
    device = resolve_device(device or cfg.train.device)
    full = cfg.train.batch_size
    small, large = min(full, 2), min(full, 8)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        steppers = {small: _stepper(cfg, small, device, captions)}
        _timed(steppers[small], 0, device)                           # the warm-up step
        t_small = (small, _timed(steppers[small], 1, device))
        if large != small:
            steppers[large] = _stepper(cfg, large, device, captions)
        t_large = (large, _timed(steppers[large], 1, device))
        # never scaled up from a batch under 8: a small batch's step is mostly fixed cost
        batch = max(large, _batch_within(t_small, t_large, full, budget_s / repeats))
        step_fn = steppers.get(batch) or _stepper(cfg, batch, device, captions)
        steppers.clear()
        times = [_timed(step_fn, i + 2, device) for i in range(repeats)]
    per_step = statistics.median(times) * full / batch
    return RunEstimate(per_step, max(0, cfg.train.steps - start), full, batch, device.type)


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h', '2.1 days': a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def bigger_preset(model, device_type: str) -> str | None:
    """The preset a GPU would give a model of this size, where this device's default is a leaner one that
    `model` matches (e.g. "cifar32" for a 32x32 run on a CPU); else None."""
    mine, gpu = default_preset(model.image_size, device_type), default_preset(model.image_size, "cuda")
    if mine is None or gpu is None or mine == gpu:
        return None
    lean = UNetConfig.preset(mine)
    same = all(getattr(model, k) == getattr(lean, k) for k in ("base_channels", "channel_mult", "num_res_blocks"))
    return gpu if same else None
