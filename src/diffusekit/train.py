"""Training: the diffusion loss and its weighting, EMA, the optimisation loop, exact resume, torchrun.

`train(run_config, out_dir)` is the public entry point; `python -m diffusekit.train --config
run.json --out DIR [--resume]` wraps it. The loop orchestrates: `diffusion_loss`, an AdamW step,
an `EMA` update, a checkpoint writer (diffusekit.checkpoint) and a sample-grid hook.

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
import copy
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from diffusekit import checkpoint as ckpt
from diffusekit.config import Config, ConfigError, check_range
from diffusekit.data import DataConfig, ImageDataset, load_dataset
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.schedule import NoiseSchedule, PredictionType, ScheduleConfig

# fields that may change when resuming (they do not alter the optimisation up to the old end)
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.sample_every")


@dataclass
class TrainConfig(Config):
    """Optimisation, EMA, precision and logging of a run. Defaults suit 8x8 digits on a 2-core CPU.

    With the tiny8 UNet on digits, the defaults give recognisable class-conditional digits by step
    1000 (loss ~0.07); 2000 steps take about 2-5 minutes on a 2-core CPU.
    """

    steps: int = 2000
    batch_size: int = 64                # global batch (split across torchrun ranks)
    lr: float = 2e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"   # after the linear warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True             # decay_n = min(ema_decay, (1 + n) / (10 + n)) after n updates
    prediction_type: PredictionType = "epsilon"
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0          # Hang et al. 2023
    mixed_precision: Literal["no", "bf16"] = "no"   # bf16: autocast of the model call
    channels_last: bool = False
    class_dropout: float = 0.1          # prob. of the null label (for CFG); ignored by unconditional models
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if available
    log_every: int = 50
    save_every: int = 500               # also at the last step
    sample_every: int = 500             # also at the last step; 0 = never
    num_sample_images: int = 100
    sample_sampler: str = "dpmpp_2m"
    sample_steps: int = 25

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "num_sample_images", "sample_steps"):
            check_range(name, getattr(self, name), lo=1)
        for name in ("warmup_steps", "sample_every", "seed"):
            check_range(name, getattr(self, name), lo=0)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("weight_decay", self.weight_decay, lo=0)
        check_range("grad_clip", self.grad_clip, lo=0)
        check_range("ema_decay", self.ema_decay, lo=0, hi=1, hi_open=True)
        check_range("min_snr_gamma", self.min_snr_gamma, lo=0, lo_open=True)
        check_range("class_dropout", self.class_dropout, lo=0, hi=1, hi_open=True)
        from diffusekit.samplers import SAMPLERS
        if self.sample_sampler not in SAMPLERS:
            raise ConfigError(f"sample_sampler={self.sample_sampler!r} is not a sampler; choose one of "
                              f"{sorted(SAMPLERS)}.")


@dataclass
class RunConfig(Config):
    """Everything a run needs: model, noise schedule, data and training. Saved as config.json."""

    model: UNetConfig = field(default_factory=lambda: UNetConfig.preset("tiny8", num_classes=10))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_names: list[str] = field(default_factory=list)   # filled from the data when training starts

    def validate(self) -> None:
        m, d = self.model, self.data
        if d.image_size and d.image_size != m.image_size:
            raise ConfigError(f"data.image_size={d.image_size} but model.image_size={m.image_size}; "
                              f"set both to the same size.")
        if d.channels != m.in_channels:
            raise ConfigError(f"data.channels={d.channels} but model.in_channels={m.in_channels}; "
                              f"set model.in_channels={d.channels} (or convert the data).")
        if self.class_names and m.num_classes and len(self.class_names) != m.num_classes:
            raise ConfigError(f"class_names lists {len(self.class_names)} classes but model.num_classes="
                              f"{m.num_classes}; make them agree.")


def check_data_fits(cfg: RunConfig, data: ImageDataset) -> None:
    """Raise ConfigError if the loaded images or labels do not fit the model config."""
    m = cfg.model
    if data.image_size != m.image_size:
        raise ConfigError(f"the data holds {data.image_size}x{data.image_size} images but model.image_size="
                          f"{m.image_size}; set model.image_size={data.image_size}, or data.image_size="
                          f"{m.image_size} to resize the images.")
    if data.channels != m.in_channels:
        raise ConfigError(f"the data has {data.channels} channel(s) but model.in_channels={m.in_channels}; "
                          f"set model.in_channels={data.channels}.")
    if m.num_classes and data.labels is None:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data has no labels; set "
                          f"model.num_classes=0 for an unconditional model, or use labelled data.")
    if m.num_classes and m.num_classes != data.num_classes:
        raise ConfigError(f"the data has {data.num_classes} classes but model.num_classes={m.num_classes}; "
                          f"set model.num_classes={data.num_classes} (or 0 to ignore the labels).")
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"the data holds {len(data)} images, fewer than batch_size={cfg.train.batch_size}; "
                          f"set batch_size to at most {len(data)}.")


PRESET_FOR_SIZE = {8: "tiny8", 16: "small16", 28: "mnist28", 32: "cifar32", 64: "64"}


def default_run_config(data: DataConfig | None = None, dataset: ImageDataset | None = None,
                       **train_overrides) -> RunConfig:
    """A RunConfig for the data: the UNet preset of its image size, its channels and classes."""
    data = data or DataConfig()
    dataset = dataset if dataset is not None else load_dataset(data)
    size = dataset.image_size
    if size not in PRESET_FOR_SIZE:
        raise ConfigError(f"no UNet preset for {size}x{size} images (presets: {sorted(PRESET_FOR_SIZE)}); "
                          f"set data.image_size to one of those, or build a UNetConfig yourself.")
    model = UNetConfig.preset(PRESET_FOR_SIZE[size], image_size=size, in_channels=dataset.channels,
                              num_classes=dataset.num_classes if dataset.labels is not None else 0)
    return RunConfig(model=model, data=data, train=TrainConfig(**train_overrides),
                     class_names=list(dataset.class_names) if dataset.labels is not None else [])


# ---------------------------------------------------------------------------------------------
# the loss


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


# ---------------------------------------------------------------------------------------------
# EMA, learning rate, seeds and data order


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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then constant or cosine to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    # lr = lr_max * (1 + cos(pi * progress)) / 2   (Loshchilov & Hutter 2017, SGDR eq. 5, no restarts)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and a tuple of keys, e.g. ("step", 120, rank)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class DataOrder:
    """Which images make up each step's global batch: a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_images, batch_size, seed
        self.batches_per_epoch = num_images // batch_size      # the last partial batch is dropped
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


# ---------------------------------------------------------------------------------------------
# the loop


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the message names the step and last checkpoint."""

    def __init__(self, step: int, what: str, value: float, run_dir: Path, saved_step: int | None):
        self.step, self.saved_step = step, saved_step
        self.checkpoint = run_dir if saved_step is not None else None
        where = (f"the last good checkpoint is {run_dir} (step {saved_step}) and was kept"
                 if saved_step is not None else "no checkpoint had been saved yet")
        super().__init__(f"training diverged: {what} is {value} at step {step}; {where}. Lower lr, "
                         f"raise warmup_steps or set grad_clip > 0, and start a new run.")


@dataclass
class TrainResult:
    """What `train` returns: where the run is, how far it got, and the trained models."""
    run_dir: Path
    step: int
    loss: float | None            # mean loss of the last logging window
    seconds: float                # training time, including before a resume
    model: torch.nn.Module        # raw weights
    ema_model: torch.nn.Module    # EMA weights (what sampling uses)


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    created: bool = False         # whether train() initialised the process group (and must destroy it)

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()


def _setup_device(pref: str) -> tuple[_Dist, torch.device]:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (gloo or nccl)."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available; set device='auto' or 'cpu'.")
    use_cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), torch.device("cuda" if use_cuda else "cpu")
    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), created), device


class _MetricsLog:
    """metrics.jsonl: one JSON record per logging step; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = []
        if start_step > 0 and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        ckpt.write_text_atomic(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


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
        self.sampler = get_sampler(tc.sample_sampler, schedule, prediction_type=tc.prediction_type)
        self.num_steps, self.seed, self.device = tc.sample_steps, tc.seed, device

    @torch.no_grad()
    def save(self, ema_model: torch.nn.Module, path: Path, autocast) -> Path:
        from diffusekit.viz import save_grid
        g = torch.Generator(self.device).manual_seed(derive_seed(self.seed, "grid-sampler"))
        with autocast:
            x = self.sampler.sample(ema_model, self.x_T, num_steps=self.num_steps, generator=g, **self.cond)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(x.float().clamp(-1, 1).cpu(), path, nrow=self.nrow)


def train(run_config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the run's UNet on its data and write the run directory `out_dir` (see DESIGN.md).

    resume=True continues the checkpoint in out_dir (exactly, on the CPU) and starts fresh if there
    is none; resume=False refuses a folder that already holds a checkpoint. Under torchrun each
    process calls this; rank 0 writes the files. Raises TrainingDiverged on a NaN/inf loss.
    The caller's global RNG state is left as it was (the loop seeds inside torch.random.fork_rng).
    """
    dist, device = _setup_device(run_config.train.device)
    try:
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return _train(run_config, Path(out_dir), resume, progress, dist, device)
    finally:
        if dist.created:
            torch.distributed.destroy_process_group()


def _open_run(cfg: RunConfig, run_dir: Path, resume: bool, dist: _Dist) -> dict | None:
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
    saved = read_run_config(run_dir)
    diff = {k: v for k, v in saved.diff(cfg).items() if k not in RESUMABLE_CHANGES}
    if diff:
        lines = "\n  ".join(f"{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {run_dir} with a different config; these fields differ:\n  {lines}\n"
                          f"Use the checkpoint's {ckpt.CONFIG_FILE}, or start a new run (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change on resume).")
    return ckpt.read_trainer_state(run_dir, finish_interrupted=False)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, dist: _Dist,
           device: torch.device) -> TrainResult:
    from tqdm.auto import tqdm
    tc, rank0 = cfg.train, dist.rank == 0
    dataset = load_dataset(cfg.data)
    use_labels = cfg.model.num_classes > 0
    check_data_fits(cfg, dataset)
    cfg = RunConfig.from_dict({**cfg.to_dict(), "class_names": list(dataset.class_names) if use_labels else []})
    if tc.batch_size % dist.world_size:
        raise ConfigError(f"batch_size={tc.batch_size} is the global batch and must split evenly over "
                          f"{dist.world_size} processes; use a multiple of {dist.world_size}.")
    state = _open_run(cfg, run_dir, resume, dist)

    # 1. model, EMA and optimizer, identical on every rank
    torch.manual_seed(derive_seed(tc.seed, "init"))
    model = UNet(cfg.model).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, elapsed_before = 0, 0.0
    if state is not None:
        ckpt.load_state_dict_checked(model, ckpt.read_weights(run_dir / ckpt.RAW_FILE)[0], str(run_dir))
        ckpt.load_state_dict_checked(ema.model, ckpt.read_weights(run_dir / ckpt.EMA_FILE)[0], str(run_dir))
        opt.load_state_dict(state["optimizer"])
        ema.num_updates, step, elapsed_before = state["ema_num_updates"], state["step"], state["elapsed"]
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # 2. data, schedule, hooks
    schedule = NoiseSchedule.from_config(cfg.schedule)
    images = dataset.images.to(device)
    labels = dataset.labels.to(device) if use_labels else None
    order = DataOrder(len(dataset), tc.batch_size, tc.seed)
    per_rank = tc.batch_size // dist.world_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if tc.mixed_precision == "bf16" else nullcontext()
    grid = _SampleGrid(cfg, schedule, device) if rank0 and tc.sample_every else None
    metrics = _MetricsLog(run_dir / "metrics.jsonl", step) if rank0 else None
    if rank0:
        ckpt.write_text_atomic(run_dir / ckpt.CONFIG_FILE, cfg.to_json() + "\n")
    saved_step = step if state is not None else None
    model_meta = {"model_config": json.dumps(cfg.model.to_dict()), "prediction_type": tc.prediction_type}

    def save(step: int) -> None:
        nonlocal saved_step
        if rank0:
            trainer_state = {"optimizer": opt.state_dict(), "ema_num_updates": ema.num_updates,
                             "elapsed": elapsed_before + time.time() - t_start, "seed": tc.seed,
                             "world_size": dist.world_size,
                             "data_order": {"epoch": step // order.batches_per_epoch,
                                            "batches_per_epoch": order.batches_per_epoch}}
            ckpt.save_checkpoint(run_dir, step, ema=ema.model.state_dict(), raw=model.state_dict(),
                                 trainer_state=trainer_state, config_json=cfg.to_json() + "\n",
                                 metadata=model_meta)
            _plot_loss(run_dir)
        saved_step = step
        dist.barrier()

    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and rank0), desc="train", unit="step",
               dynamic_ncols=True)
    t_start = t_window = time.time()
    window_loss, window_steps, last_loss, smooth = 0.0, 0, None, None
    model.train()
    while step < tc.steps:
        # 3. one optimisation step; all randomness from (seed, step, rank)
        idx = order.batch(step)[dist.rank * per_rank:(dist.rank + 1) * per_rank].to(device)
        g = torch.Generator(device).manual_seed(derive_seed(tc.seed, "step", step, dist.rank))
        torch.manual_seed(derive_seed(tc.seed, "global", step, dist.rank))     # dropout layers
        x0 = dataset.augment(images[idx], g)
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond = {}
        if labels is not None:
            y = labels[idx]
            if tc.class_dropout > 0:
                # label -> null class with prob. class_dropout (classifier-free guidance, Ho & Salimans 2022)
                drop = torch.rand(y.shape, generator=g, device=device) < tc.class_dropout
                y = torch.where(drop, torch.full_like(y, -1), y)
            cond["class_labels"] = y
        lr = lr_at(tc, step)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            loss = diffusion_loss(net, schedule, x0, tc.prediction_type, g, tc.loss_weighting,
                                  tc.min_snr_gamma, **cond)
        loss_value = loss.detach().clone()
        if dist.world_size > 1:
            torch.distributed.all_reduce(loss_value)
            loss_value /= dist.world_size
        loss_value = loss_value.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(step + 1, "the loss", loss_value, run_dir, saved_step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf).item()
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(step + 1, "the gradient norm", grad_norm, run_dir, saved_step)
        opt.step()
        ema.update(model)
        step += 1

        # 4. logging, grids, checkpoints
        window_loss, window_steps = window_loss + loss_value, window_steps + 1
        smooth = loss_value if smooth is None else 0.98 * smooth + 0.02 * loss_value
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.time()
            last_loss = window_loss / window_steps
            if rank0:
                metrics.write({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                               "images_per_s": window_steps * tc.batch_size / max(now - t_window, 1e-9),
                               "time": elapsed_before + now - t_start})
            window_loss, window_steps, t_window = 0.0, 0, now
        if grid is not None and (step % tc.sample_every == 0 or step == tc.steps):
            grid.save(ema.model, run_dir / "samples" / f"step_{step:06d}.png", autocast)
        if step % tc.save_every == 0 or step == tc.steps:
            save(step)
    bar.close()
    seconds = elapsed_before + time.time() - t_start
    return TrainResult(run_dir, step, last_loss, seconds, model, ema.model)


def _plot_loss(run_dir: Path) -> None:
    from diffusekit.viz import plot_loss, read_metrics
    path = run_dir / "metrics.jsonl"
    if path.exists() and read_metrics(path):
        plot_loss(path, run_dir / "loss.png")


# ---------------------------------------------------------------------------------------------
# loading a finished run


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig in run_dir/config.json; errors name the file and any unknown key."""
    path = Path(run_dir) / ckpt.CONFIG_FILE
    data = ckpt.read_config_json(run_dir)
    try:
        return RunConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             weights: Literal["ema", "raw"] = "ema") -> tuple[RunConfig, UNet, dict[str, Any]]:
    """(config, model in eval mode, extra) of a run directory; EMA weights unless weights="raw".

    extra: {"step", "class_names", "weights_path", "metadata"}. Errors name a missing file, the
    config fields that differ from those the weights were trained with, or the mismatching keys.
    """
    run_dir = Path(run_dir)
    try:
        ckpt.recover(run_dir)
    except OSError:
        pass        # a read-only copy: read what is there
    cfg = read_run_config(run_dir)
    path = run_dir / (ckpt.EMA_FILE if weights == "ema" else ckpt.RAW_FILE)
    state_dict, meta = ckpt.read_weights(path)
    if "model_config" in meta:
        trained = UNetConfig.from_dict(json.loads(meta["model_config"]))
        diff = cfg.model.diff(trained)
        if diff:
            lines = "\n  ".join(f"model.{k}: config.json has {a!r}, the weights were trained with {b!r}"
                                for k, (a, b) in diff.items())
            raise ckpt.CheckpointError(f"{path} does not match {run_dir / ckpt.CONFIG_FILE}:\n  {lines}\n"
                                       f"Restore config.json from the run, or set those fields back.")
    model = UNet(cfg.model)
    ckpt.load_state_dict_checked(model, state_dict, str(path),
                                 hint=f"Check the model section of {run_dir / ckpt.CONFIG_FILE}.")
    extra = {"step": int(meta["step"]) if "step" in meta else None, "class_names": list(cfg.class_names),
             "weights_path": path, "metadata": meta}
    return cfg, model.to(device).eval(), extra


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusekit.train --config run.json --out DIR [--resume]`."""
    p = argparse.ArgumentParser(prog="python -m diffusekit.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="a RunConfig JSON file (e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    result = train(RunConfig.from_json(args.config), args.out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step} in {result.seconds:.1f} s; loss {result.loss}; run in {result.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
