"""Training the KL autoencoder of latent diffusion; loading it (or a diffusers AutoencoderKL) frozen.

`train_autoencoder(run_cfg, out_dir)` trains a `KLAutoencoder` (nn/autoencoder.py) on its
reconstruction + KL loss with the shared loop skeleton (diffusekit.loop: per-step seeds, lr
schedule, divergence stop) and writes the folder, as the diffusion trainer writes a run:
  config.json             AutoencoderRunConfig; autoencoder.scaling_factor is set when training ends
  model.safetensors       EMA weights (what encoding uses); metadata autoencoder_config, scaling_factor
  model_raw.safetensors   raw weights;   trainer_state.pt: optimizer, EMA count, step (exact resume)
  metrics.jsonl           loss, rec, kl, lr per log step; held-out PSNR at each save and at the end
  reconstructions.png     held-out originals (odd rows) over their reconstructions (even rows)
Saves go through checkpoint.save_checkpoint under the folder's RunLock. Every random draw of
step s comes from (seed, s), so on the CPU a resumed run equals an uninterrupted one bit for bit.

When training ends, the latent scaling factor 1 / std(z) of the unscaled posterior modes over the
training images (LDM sec. 4.3.2) is computed with the EMA weights and saved in config.json and
in the weights' metadata; intermediate checkpoints carry none, and load_autoencoder refuses them.
Reconstruction PSNR is measured on a seeded held-out share of the data (data.split_heldout).

`load_autoencoder(path)` gives a frozen autoencoder from such a folder or a diffusers AutoencoderKL
folder; `autoencoder_fingerprint(path)` names its weights and scale, to key a latent cache.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import safetensors
import torch

from diffusekit import store as ckpt
from diffusekit.config import Config, ConfigError, check_range
from diffusekit.data import BatchSource, DataConfig, DataOrder, ImageDataset, load_dataset, split_heldout
from diffusekit.device import (DeviceChoice, Precision, autocast, check_precision, grad_scaler, rank_world,
                               resolve_device)
from diffusekit.metrics import psnr
from diffusekit.loop import EMA, Dist, MetricsLog, check_loss, clip_and_step, run_loop
from diffusekit.seeding import derive_seed
from diffusekit.nn.autoencoder import (AutoencoderConfig, DiffusersAutoencoder, KLAutoencoder,
                                       load_diffusers_autoencoder)
from diffusekit.viz import plot_loss, save_grid

GRID_FILE = "reconstructions.png"
METRICS_FILE = "metrics.jsonl"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model*.safetensors"
# fields that may change on resume: they do not alter the optimisation up to the old end
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.device", "train.eval_images",
                     "train.eval_batch_size", "train.num_grid_images", "train.scaling_images",
                     "autoencoder.scaling_factor")


@dataclass
class AutoencoderTrainConfig(Config):
    """Optimisation, EMA, precision, evaluation and logging of an autoencoder. Defaults: shapes on a 2-core CPU.

    With cpu_autoencoder_config on shapes the defaults gave 31 dB held-out PSNR at step 500 and 34 dB
    at step 1000, in about 3 minutes of one CPU thread (issue 9's goal: >= 30 dB).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"   # after the linear warm-up
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True             # decay_n = min(ema_decay, (1 + n) / (10 + n)) after n updates
    precision: Precision = "auto"       # auto (bf16 where native, else fp32) / fp32 / bf16 / fp16 (grad scaler)
    logvar_init: float | None = -8.0    # initial posterior log-variance (see init_posterior_logvar); None = as built
    seed: int = 0
    device: DeviceChoice = "auto"
    log_every: int = 50
    save_every: int = 500               # also at the end; each save measures held-out PSNR and writes the grid
    heldout_fraction: float = 0.1       # kept out of training for PSNR (the IDX t10k split for IDX folders)
    eval_images: int = 1000             # held-out images PSNR is measured on; 0 = all
    eval_batch_size: int = 250
    num_grid_images: int = 16           # held-out images in reconstructions.png
    scaling_images: int = 10000         # training images (a seeded choice) the latent std is taken over; 0 = all

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "eval_batch_size", "num_grid_images"):
            check_range(name, getattr(self, name), lo=1)
        for name in ("warmup_steps", "seed", "eval_images", "scaling_images"):
            check_range(name, getattr(self, name), lo=0)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("weight_decay", self.weight_decay, lo=0)
        check_range("grad_clip", self.grad_clip, lo=0)
        check_range("ema_decay", self.ema_decay, lo=0, hi=1, hi_open=True)
        check_range("heldout_fraction", self.heldout_fraction, lo=0, hi=1, lo_open=True, hi_open=True)


def cpu_autoencoder_config(in_channels: int = 3, **overrides) -> AutoencoderConfig:
    """The laptop autoencoder: factor 4 (32x32 -> 8x8), 4 latent channels, 16-32-32 channels, MSE loss.

    MSE, not LDM's L1: on mostly black images (shapes, digits) L1's per-pixel median is the background,
    and the L1 model sat at all-black reconstructions (14 dB on shapes) where the MSE one kept learning.
    """
    kw = dict(in_channels=in_channels, base_channels=16, channel_mult=(1, 2, 2), latent_channels=4,
              num_res_blocks=1, groups=8, loss="mse")
    return AutoencoderConfig(**{**kw, **overrides})


@dataclass
class AutoencoderRunConfig(Config):
    """Everything saved beside the autoencoder's weights (config.json)."""

    autoencoder: AutoencoderConfig = field(default_factory=cpu_autoencoder_config)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="shapes"))
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)

    def validate(self) -> None:
        a, d = self.autoencoder, self.data
        if d.channels and d.channels != a.in_channels:
            raise ConfigError(f"data.channels={d.channels} but autoencoder.in_channels={a.in_channels}; "
                              f"set autoencoder.in_channels={d.channels}.")
        f = a.downsample_factor
        if d.image_size % f:
            raise ConfigError(f"data.image_size={d.image_size} is not divisible by the autoencoder's "
                              f"downsampling factor {f}; use a multiple of {f}, such as {max(f, d.image_size // f * f)}.")


def autoencoder_run_config(data: DataConfig | None = None, dataset: ImageDataset | None = None,
                           autoencoder: dict | None = None, **train_overrides) -> AutoencoderRunConfig:
    """A run config for the data: `cpu_autoencoder_config` with the data's channels (+ overrides)."""
    data = data or DataConfig(source="shapes")
    dataset = dataset if dataset is not None else load_dataset(data)
    ae = cpu_autoencoder_config(dataset.channels, **(autoencoder or {}))
    return AutoencoderRunConfig(ae, data, AutoencoderTrainConfig(**train_overrides))


def read_autoencoder_config(out_dir: str | Path) -> AutoencoderRunConfig:
    """The AutoencoderRunConfig in out_dir/config.json; errors name the file, and a diffusion run's config."""
    return _parse_config(ckpt.read_config_json(out_dir), Path(out_dir))


def _parse_config(d, out_dir: Path) -> AutoencoderRunConfig:
    path = out_dir / ckpt.CONFIG_FILE
    if isinstance(d, dict) and "autoencoder" not in d:
        what = "a diffusion run (it has a model section)" if "model" in d else f"not an autoencoder's (keys {sorted(d)})"
        raise ConfigError(f"{path} is {what}, not an autoencoder folder; give a folder written by "
                          f"train_autoencoder (`diffusekit train-autoencoder --out runs/ae`) or a diffusers "
                          f"AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).")
    try:
        return AutoencoderRunConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def check_data_fits(cfg: AutoencoderRunConfig, data: ImageDataset) -> None:
    """Raise ConfigError if the loaded images do not fit the autoencoder (channels, size, count)."""
    a = cfg.autoencoder
    if data.channels != a.in_channels:
        raise ConfigError(f"the data has {data.channels} channel(s) but autoencoder.in_channels={a.in_channels}; "
                          f"set autoencoder.in_channels={data.channels}.")
    f = a.downsample_factor
    if data.image_size % f:
        raise ConfigError(f"the data holds {data.image_size}x{data.image_size} images, not divisible by the "
                          f"autoencoder's downsampling factor {f}; set data.image_size to a multiple of {f}, "
                          f"such as {max(f, data.image_size // f * f)}, or use fewer channel_mult levels.")


def _split(cfg: AutoencoderRunConfig, dataset: ImageDataset) -> tuple[ImageDataset, ImageDataset, str]:
    """(training images, held-out images, description) by data.split_heldout."""
    if dataset.labels is None:      # split_heldout subsets labels too; an autoencoder needs none
        dataset = ImageDataset(dataset.images, torch.zeros(len(dataset), dtype=torch.int64), source=dataset.source)
    return split_heldout(cfg.data, dataset, cfg.train.heldout_fraction, cfg.train.seed)


# ---------------------------------------------------------------------------------------------
# evaluation: PSNR, the grid, the scaling factor


@torch.no_grad()
def _map_batches(fn, images: torch.Tensor, batch_size: int, device: torch.device, precision: str) -> torch.Tensor:
    """fn applied to images in batches on `device` under autocast; float32 results on the CPU."""
    out = []
    for x in images.split(batch_size):
        with autocast(device, precision):
            out.append(fn(x.to(device)).float().cpu())
    return torch.cat(out)


def reconstruct(autoencoder, images: torch.Tensor, batch_size: int = 250, precision: str = "fp32") -> torch.Tensor:
    """decode(encode(x)) of images (N, C, H, W) in [-1, 1] (posterior modes), clamped to [-1, 1], on the CPU."""
    device = next(autoencoder.parameters()).device
    return _map_batches(lambda x: autoencoder.decode(autoencoder.encode(x)), images, batch_size, device,
                        precision).clamp(-1, 1)


def reconstruction_psnr(autoencoder, images: torch.Tensor, batch_size: int = 250, precision: str = "fp32") -> float:
    """PSNR in dB of the reconstructions over all pixels of the images (data range 2 for [-1, 1])."""
    return psnr(reconstruct(autoencoder, images, batch_size, precision), images)


def latent_scaling_factor(autoencoder: KLAutoencoder, images: torch.Tensor, batch_size: int = 250,
                          precision: str = "fp32") -> float:
    """1 / std of the unscaled latents (posterior modes, what encode caches) of the images (LDM sec. 4.3.2)."""
    device = next(autoencoder.parameters()).device
    latents = _map_batches(lambda x: autoencoder.posterior(x).mode(), images, batch_size, device, precision)
    return KLAutoencoder.compute_scaling_factor(latents)


def save_reconstruction_grid(images: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             per_row: int = 8) -> Path:
    """A grid of rows of up to per_row originals, each row followed by a row of their reconstructions."""
    rows = [t for a, b in zip(images.split(per_row), reconstructions.split(per_row)) for t in (a, b)]
    nrow = min(per_row, len(images))
    padded = [torch.cat([r, -torch.ones(nrow - len(r), *r.shape[1:])]) for r in rows]  # short last pair: black
    return save_grid(torch.cat(padded), path, nrow=nrow)


class _Evaluator:
    """Held-out PSNR and grid images, and the training images the scaling factor is taken over."""

    def __init__(self, cfg: AutoencoderRunConfig, train_images: torch.Tensor, held_images: torch.Tensor):
        tc = cfg.train
        self.tc, self.held = tc, held_images[:tc.eval_images or None]
        self.grid_images = held_images[:tc.num_grid_images]
        n = tc.scaling_images or len(train_images)
        if n < len(train_images):
            g = torch.Generator().manual_seed(derive_seed(tc.seed, "scaling"))
            train_images = train_images[torch.randperm(len(train_images), generator=g)[:n].sort().values]
        self.scaling = train_images

    def psnr(self, model) -> float:
        return reconstruction_psnr(model, self.held, self.tc.eval_batch_size, self.tc.precision)

    def grid(self, model, path: Path) -> Path:
        rec = reconstruct(model, self.grid_images, self.tc.eval_batch_size, self.tc.precision)
        return save_reconstruction_grid(self.grid_images, rec, path)

    def scaling_factor(self, model) -> float:
        return latent_scaling_factor(model, self.scaling, self.tc.eval_batch_size, self.tc.precision)


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class AutoencoderTrainResult:
    """What `train_autoencoder` returns."""
    out_dir: Path
    step: int                     # the step the saved weights are at
    start_step: int               # where this call started: 0, or the checkpoint's step on resume
    loss: float | None            # mean loss of the last logging window (None if no step ran)
    psnr: float                   # held-out reconstruction PSNR (dB) of the EMA weights
    heldout: str                  # which images PSNR was measured on
    scaling_factor: float         # 1 / std of the unscaled latents over the training images
    seconds: float                # training time, including before a resume
    config: AutoencoderRunConfig  # as saved (scaling factor set)
    model: KLAutoencoder          # raw weights
    ema_model: KLAutoencoder      # EMA weights with the scaling factor (what load_autoencoder gives), eval


def train_autoencoder(run_cfg: AutoencoderRunConfig, out_dir: str | Path, resume: bool = False,
                      progress: bool = True, dataset: ImageDataset | None = None) -> AutoencoderTrainResult:
    """Train the autoencoder on run_cfg.data and write out_dir (see the module docstring).

    resume=True continues the checkpoint in out_dir (exactly, on the CPU) and starts fresh if there
    is none; resume=False refuses a folder that already holds one. dataset: the data already loaded
    for run_cfg.data (in memory). Raises TrainingDiverged on a NaN/inf loss. One process only.
    The caller's global RNG state is left as it was.
    """
    if rank_world()[1] > 1:
        raise ConfigError("train_autoencoder runs in one process; start it without torchrun (WORLD_SIZE=1).")
    device = resolve_device(run_cfg.train.device)
    check_precision(run_cfg.train.precision, device)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ckpt.CheckpointWriteError(f"cannot create {out_dir}: {e.strerror or e}; choose another --out.") from e
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), ckpt.RunLock(out_dir):
        return _train(run_cfg, out_dir, resume, progress, device, dataset)


def _open_run(cfg: AutoencoderRunConfig, out_dir: Path, resume: bool) -> dict | None:
    """The trainer state to resume from, or None; refuses a checkpoint without resume or with other settings."""
    ckpt.recover(out_dir)
    if not (out_dir / ckpt.STATE_FILE).exists():
        return None
    state = ckpt.read_trainer_state(out_dir, finish_interrupted=False)
    if not resume:
        raise ckpt.CheckpointError(f"{out_dir} already holds a checkpoint at step {state['step']}; pass "
                                   f"resume=True (--resume) to continue it, or choose a new output folder.")
    saved = read_autoencoder_config(out_dir)
    diff = {k: v for k, v in saved.diff(cfg).items() if k not in RESUMABLE_CHANGES}
    if diff:
        lines = "\n  ".join(f"{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {out_dir} with a different config; these fields differ:\n  {lines}\n"
                          f"Use the checkpoint's {ckpt.CONFIG_FILE}, or start a new run (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change on resume).")
    return state


@torch.no_grad()
def init_posterior_logvar(model: KLAutoencoder, logvar: float) -> None:
    """Start q(z | x) nearly deterministic: the bias of the encoder's log-variance outputs set to `logvar`.

    At the usual init (logvar ~ 0) the decoder first sees latents drowned in unit noise, and with
    LDM's tiny KL weight the log-variance then falls only by about lr per step; starting it low lets
    the reconstruction learn at once (shapes, MSE loss: 25 dB held-out PSNR after 200 steps at -8, 18 dB at 0).
    """
    conv = model.encoder[-1]            # (mean, logvar) = its output chunked in two along channels
    conv.bias[model.config.latent_channels:] = logvar


def _build(cfg: AutoencoderRunConfig, device: torch.device, out_dir: Path, state: dict | None):
    """(model, EMA, optimizer, start step, elapsed seconds, saved scaling factor or None)."""
    tc = cfg.train
    torch.manual_seed(derive_seed(tc.seed, "init"))
    model = KLAutoencoder(cfg.autoencoder).to(device)
    if tc.logvar_init is not None:
        init_posterior_logvar(model, tc.logvar_init)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if state is None:
        return model, ema, opt, 0, 0.0, None
    ckpt.load_state_dict_checked(model, ckpt.read_weights(out_dir / ckpt.RAW_FILE)[0], str(out_dir))
    ema_weights, meta = ckpt.read_weights(out_dir / ckpt.EMA_FILE)
    ckpt.load_state_dict_checked(ema.model, ema_weights, str(out_dir))
    opt.load_state_dict(state["optimizer"])
    ema.num_updates = state["ema_num_updates"]
    scale = float(meta["scaling_factor"]) if "scaling_factor" in meta else None
    return model, ema, opt, state["step"], state["elapsed"], scale


class _Hooks:
    """After each step: the logging window and metrics.jsonl, and the intermediate checkpoints."""

    def __init__(self, tc: AutoencoderTrainConfig, save, metrics: MetricsLog, start: int, elapsed_before: float):
        self.tc, self.save_fn, self.metrics = tc, save, metrics
        self.window: dict[str, float] = {}
        self.window_steps, self.last_loss = 0, None
        self.saved_step, self.elapsed_before = (start if start > 0 else None), elapsed_before
        self.t_start = self.t_window = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def __call__(self, step: int, numbers: dict) -> None:
        tc = self.tc
        for key in ("loss", "rec", "kl", "grad_norm"):
            self.window[key] = self.window.get(key, 0.0) + numbers[key]
        self.window_steps += 1
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.time()
            means = {k: v / self.window_steps for k, v in self.window.items()}
            self.last_loss = means["loss"]
            self.metrics.write({"step": step, **means, "lr": numbers["lr"], "time": self.elapsed(),
                                "images_per_s": self.window_steps * tc.batch_size / max(now - self.t_window, 1e-9)})
            self.window, self.window_steps, self.t_window = {}, 0, now
        if step % tc.save_every == 0 and step < tc.steps:      # the last save is the final one (_finish)
            self.save_fn(step, self.elapsed())
            self.saved_step = step


def _train(cfg: AutoencoderRunConfig, out_dir: Path, resume: bool, progress: bool, device: torch.device,
           dataset: ImageDataset | None) -> AutoencoderTrainResult:
    tc = cfg.train
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    if not isinstance(dataset, ImageDataset):
        raise ConfigError(f"train_autoencoder holds its images in memory; pass dataset=load_dataset(data) or "
                          f"None, not a {type(dataset).__name__}.")
    check_data_fits(cfg, dataset)
    # the scale is measured at the end; until then the config records the neutral 1.0
    cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, scaling_factor=1.0))
    train_set, held_set, held_desc = _split(cfg, dataset)
    if len(train_set) < tc.batch_size:
        raise ConfigError(f"{len(train_set)} training images (after holding out {len(held_set)}), fewer than "
                          f"batch_size={tc.batch_size}; set batch_size to at most {len(train_set)}.")
    state = _open_run(cfg, out_dir, resume)
    model, ema, opt, start, elapsed, saved_scale = _build(cfg, device, out_dir, state)
    evaluator = _Evaluator(cfg, train_set.images, held_set.images)
    if saved_scale is not None and start >= tc.steps:
        # a resumed run that had already ended: nothing to train or write
        final = replace(cfg, autoencoder=replace(cfg.autoencoder, scaling_factor=saved_scale))
        value = evaluator.psnr(ema.model)           # as the final save measured it: with the neutral scale
        ema.model.config = final.autoencoder
        return AutoencoderTrainResult(out_dir, start, start, None, value, held_desc, saved_scale, elapsed, final,
                                      model, ema.model)
    source = BatchSource(train_set, tc.batch_size, tc.seed, device=device)
    scaler = grad_scaler(device, tc.precision)

    def step_fn(step: int, g: torch.Generator) -> dict:
        x = source.batch(step).images
        opt.zero_grad(set_to_none=True)
        with autocast(device, tc.precision):
            loss, parts = model.loss(x, g)
        loss_value = loss.item()
        check_loss(loss_value)
        scaler.scale(loss).backward()
        grad_norm = clip_and_step(model, opt, scaler, tc.grad_clip)
        ema.update(model)
        return {"loss": loss_value, "rec": parts["rec"].item(), "kl": parts["kl"].item(), "grad_norm": grad_norm}

    metrics = MetricsLog(out_dir / METRICS_FILE, start)
    if state is None:        # on resume config.json changes only with the next save, beside its weights
        ckpt.write_text_atomic(out_dir / ckpt.CONFIG_FILE, cfg.to_json() + "\n")
    saver = _Saver(cfg, out_dir, model, ema, opt, source.order, evaluator, metrics)
    hooks = _Hooks(tc, saver, metrics, start, elapsed)
    model.train()
    run_loop(step_fn, start=start, total=tc.steps, seed=tc.seed, dist=Dist(), device=device, opt=opt,
             lr_config=tc, on_step=hooks, last_checkpoint=lambda: (out_dir, hooks.saved_step),
             progress=progress, desc="train-autoencoder")
    # the final save: held-out PSNR, then the latent scale of the EMA weights, in config and metadata
    ema.model.eval()
    step, scale = max(start, tc.steps), evaluator.scaling_factor(ema.model)
    final = replace(cfg, autoencoder=replace(cfg.autoencoder, scaling_factor=scale))
    value = saver(step, hooks.elapsed(), final, scale)
    ema.model.config = final.autoencoder
    return AutoencoderTrainResult(out_dir, step, start, hooks.last_loss, value, held_desc, scale, hooks.elapsed(),
                                  final, model, ema.model)


class _Saver:
    """A checkpoint: held-out PSNR and the grid of the EMA weights, a metrics record, then the atomic save."""

    def __init__(self, cfg: AutoencoderRunConfig, out_dir: Path, model, ema: EMA, opt, order: DataOrder,
                 evaluator: _Evaluator, metrics: MetricsLog):
        self.cfg, self.out_dir, self.model, self.ema, self.opt = cfg, out_dir, model, ema, opt
        self.order, self.evaluator, self.metrics = order, evaluator, metrics

    def __call__(self, step: int, elapsed: float, cfg: AutoencoderRunConfig | None = None,
                 scale: float | None = None) -> float:
        cfg, ema_model = cfg or self.cfg, self.ema.model.eval()
        value = self.evaluator.psnr(ema_model)
        self.evaluator.grid(ema_model, self.out_dir / GRID_FILE)
        # the record first: a kill before the save below drops it on resume (MetricsLog keeps step <= saved)
        self.metrics.write({"step": step, "heldout_psnr": value, **({"scaling_factor": scale} if scale else {})})
        if any("loss" in json.loads(line) for line in (self.out_dir / METRICS_FILE).read_text().splitlines()):
            plot_loss(self.out_dir / METRICS_FILE, self.out_dir / "loss.png")
        per_epoch = self.order.batches_per_epoch
        trainer_state = {"optimizer": self.opt.state_dict(), "ema_num_updates": self.ema.num_updates,
                         "elapsed": elapsed, "seed": cfg.train.seed,
                         "data_order": {"epoch": step // per_epoch, "batches_per_epoch": per_epoch}}
        ckpt.save_checkpoint(self.out_dir, step, ema=ema_model.state_dict(), raw=self.model.state_dict(),
                             trainer_state=trainer_state, config_json=cfg.to_json() + "\n",
                             metadata=weights_metadata(cfg.autoencoder, scale))
        return value


def weights_metadata(ae_cfg: AutoencoderConfig, scaling_factor: float | None) -> dict[str, str]:
    """What an autoencoder's weights record: its config and, once training has ended, the latent scale."""
    meta = {"autoencoder_config": json.dumps(ae_cfg.to_dict())}
    if scaling_factor is not None:
        meta["scaling_factor"] = repr(float(scaling_factor))      # repr: the float round-trips exactly
    return meta


# ---------------------------------------------------------------------------------------------
# loading: a folder written by train_autoencoder, or a diffusers AutoencoderKL folder

_WHAT_TO_GIVE = ("give a folder written by train_autoencoder (`diffusekit train-autoencoder --out runs/ae`) or a "
                 "diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")


def autoencoder_kind(path: str | Path) -> Literal["diffusekit", "diffusers"]:
    """Which autoencoder folder `path` is; errors name what is missing and what to give instead."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder {path} does not exist; {_WHAT_TO_GIVE}.")
    if not path.is_dir():
        raise ValueError(f"autoencoder {path} is a file; give the folder that holds it: {_WHAT_TO_GIVE}.")
    if any(path.glob(DIFFUSERS_WEIGHTS)):
        return "diffusers"
    if (path / "model_index.json").is_file():
        raise ValueError(f"{path} is a diffusers pipeline folder; give its autoencoder, the vae/ sub-folder: "
                         f"{path / 'vae'}.")
    if ckpt.EMA_FILE in ckpt.committed_files(path):
        return "diffusekit"
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{path} holds neither {ckpt.EMA_FILE} (a folder written by train_autoencoder) nor "
                            f"diffusion_pytorch_model.safetensors (a diffusers AutoencoderKL); it holds "
                            f"{present or 'nothing'}. If training was stopped before its first save, resume "
                            f"it; otherwise {_WHAT_TO_GIVE}.")


def _unfinished(path: Path, step: str | None, steps: int) -> ckpt.CheckpointError:
    return ckpt.CheckpointError(
        f"{path} is an unfinished autoencoder run (saved at step {step} of {steps}): the latent scaling factor "
        f"is measured when training ends. Finish it with train_autoencoder(..., resume=True) (`diffusekit "
        f"train-autoencoder --out {path} --resume`), with fewer steps if it is good enough already.")


def load_trained_autoencoder(path: str | Path) -> tuple[KLAutoencoder, AutoencoderRunConfig]:
    """(KLAutoencoder with its scaling factor, in eval mode; its run config) from a train_autoencoder folder."""
    path = Path(path)
    saved = ckpt.read_checkpoint(path, weights=(ckpt.EMA_FILE,))    # one committed save, even while training
    if saved.config is None:
        raise FileNotFoundError(f"{path / ckpt.CONFIG_FILE} is missing; it describes the autoencoder. Copy the "
                                f"config.json written beside {ckpt.EMA_FILE}, or {_WHAT_TO_GIVE}.")
    cfg = _parse_config(saved.config, path)
    state_dict, meta = saved.weights[ckpt.EMA_FILE]
    if "scaling_factor" not in meta:
        raise _unfinished(path, meta.get("step"), cfg.train.steps)
    if "autoencoder_config" in meta:
        trained = AutoencoderConfig.from_dict(json.loads(meta["autoencoder_config"]))
        diff = cfg.autoencoder.diff(trained)
        if diff:
            lines = "\n  ".join(f"autoencoder.{k}: config.json has {a!r}, the weights were trained with {b!r}"
                                for k, (a, b) in diff.items())
            raise ckpt.CheckpointError(f"{path / ckpt.EMA_FILE} does not match {path / ckpt.CONFIG_FILE}:\n  "
                                       f"{lines}\nRestore config.json from the autoencoder's folder.")
    scale = float(meta["scaling_factor"])
    cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, scaling_factor=scale))
    model = KLAutoencoder(cfg.autoencoder)
    ckpt.load_state_dict_checked(model, state_dict, str(path / ckpt.EMA_FILE),
                                 hint=f"Check the autoencoder section of {path / ckpt.CONFIG_FILE}.")
    return model.eval(), cfg


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> KLAutoencoder | DiffusersAutoencoder:
    """A frozen autoencoder (eval mode, requires_grad False) with encode / decode / latent_shape.

    path: a folder written by train_autoencoder (its EMA weights and latent scaling factor), or a
    diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors; its own
    scaling_factor and shift_factor).
    """
    if autoencoder_kind(path) == "diffusers":
        model = load_diffusers_autoencoder(path)
    else:
        model, _ = load_trained_autoencoder(path)
    return model.to(resolve_device(device)).eval().requires_grad_(False)


def autoencoder_fingerprint(path: str | Path) -> str:
    """A short hash (16 hex digits) of an autoencoder folder's weights files and latent scale and shift.

    It changes whenever the encodings can: new weights, or another scaling or shift factor; a key
    for a cache of encoded latents.
    """
    path = Path(path)
    if autoencoder_kind(path) == "diffusers":
        conf = json.loads((path / "config.json").read_text())
        files = sorted(path.glob(DIFFUSERS_WEIGHTS))
        scale, shift = conf.get("scaling_factor"), conf.get("shift_factor")
    else:
        files = [ckpt.committed_files(path)[ckpt.EMA_FILE]]
        with safetensors.safe_open(str(files[0]), framework="pt") as f:
            meta = f.metadata() or {}
        if "scaling_factor" not in meta:
            raise _unfinished(path, meta.get("step"), read_autoencoder_config(path).train.steps)
        scale, shift = meta["scaling_factor"], None
    h = hashlib.sha256(f"{scale!r}\0{shift!r}\0".encode())
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
