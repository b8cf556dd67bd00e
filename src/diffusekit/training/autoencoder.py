"""The autoencoder trainer: the KL autoencoder of latent diffusion on the training skeleton.

`train_autoencoder(run_cfg, run_dir)` trains a `KLAutoencoder` (nn/autoencoder.py) on its
reconstruction + KL loss with the one training skeleton (training.skeleton: lock, resume, EMA,
precision, per-step seeds, logging, journaled saves) and writes the folder store/autoencoder.py
describes, as the diffusion trainer writes a run:
  config.json             AutoencoderRunConfig; autoencoder.scaling_factor is set when training ends
  model.safetensors       EMA weights (what encoding uses); metadata autoencoder_config, scaling_factor
  model_raw.safetensors   raw weights;   trainer_state.pt: optimizer, EMA count, step (exact resume), and
                          with the adversarial term the discriminator's weights and optimizer
  metrics.jsonl           loss, rec, kl, lr per log step (+ g_loss, d_loss, adaptive_weight and the mean
                          logits of real and reconstructed images once the GAN term runs); held-out PSNR
                          at each save and at the end
  reconstructions.png     held-out originals (odd rows) over their reconstructions (even rows)
Every random draw of step s comes from (seed, s), so on the CPU a resumed run equals an
uninterrupted one bit for bit.

At the final save the latent scaling factor 1 / std(z) of the unscaled posterior modes over the
training images (LDM sec. 4.3.2) is computed with the EMA weights and saved in config.json and
in the weights' metadata; intermediate checkpoints carry none, and load_autoencoder refuses them.
Reconstruction PSNR is measured on a seeded held-out share of the data (data.split_heldout).

autoencoder.adversarial_weight > 0 adds LDM's patch-GAN term from step adversarial_start on
(training/adversarial.py); its discriminator is training state only. At 0 (the default) no
discriminator is built and training is what it was without the option, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffusekit.config import ConfigError
from diffusekit.data import BatchSource, DataConfig, ImageDataset, load_dataset, split_heldout
from diffusekit.device import autocast, check_precision, rank_world, resolve_device
from diffusekit.nn.autoencoder import KLAutoencoder
from diffusekit.store.autoencoder import (RESUMABLE_CHANGES, AutoencoderRunConfig, AutoencoderTrainConfig,
                                          cpu_autoencoder_config, read_autoencoder_config, weights_metadata)
from diffusekit.training import skeleton
from diffusekit.training.adversarial import Adversary
from diffusekit.training.loop import check_loss, clip_and_step
from diffusekit.training.processes import Dist
from diffusekit.training.reconstruction import ReconstructionEvaluator

GRID_FILE = "reconstructions.png"


def autoencoder_run_config(data: DataConfig | None = None, dataset: ImageDataset | None = None,
                           autoencoder: dict | None = None, **train_overrides) -> AutoencoderRunConfig:
    """A run config for the data: `cpu_autoencoder_config` with the data's channels (+ overrides)."""
    data = data or DataConfig(source="shapes")
    dataset = dataset if dataset is not None else load_dataset(data)
    ae = cpu_autoencoder_config(dataset.channels, **(autoencoder or {}))
    return AutoencoderRunConfig(ae, data, AutoencoderTrainConfig(**train_overrides))


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


@dataclass
class AutoencoderTrainResult:
    """What `train_autoencoder` returns."""
    run_dir: Path
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


def train_autoencoder(run_cfg: AutoencoderRunConfig, run_dir: str | Path, resume: bool = False,
                      progress: bool = True, dataset: ImageDataset | None = None) -> AutoencoderTrainResult:
    """Train the autoencoder on run_cfg.data and write run_dir (see the module docstring).

    resume=True continues the checkpoint in run_dir (exactly, on the CPU) and starts fresh if there
    is none; resume=False refuses a folder that already holds one. dataset: the data already loaded
    for run_cfg.data (in memory). Raises TrainingDiverged on a NaN/inf loss. One process only.
    The caller's global RNG state is left as it was.
    """
    if rank_world()[1] > 1:
        raise ConfigError("train_autoencoder runs in one process; start it without torchrun (WORLD_SIZE=1).")
    device = resolve_device(run_cfg.train.device)
    check_precision(run_cfg.train.precision, device)
    run_dir = Path(run_dir)
    skeleton.create_folder(run_dir, run_cfg.data.source)
    with skeleton.locked(run_dir, Dist(), device):
        return _train(run_cfg, run_dir, resume, progress, device, dataset)


@torch.no_grad()
def init_posterior_logvar(model: KLAutoencoder, logvar: float) -> None:
    """Start q(z | x) nearly deterministic: the bias of the encoder's log-variance outputs set to `logvar`.

    At the usual init (logvar ~ 0) the decoder first sees latents drowned in unit noise, and with
    LDM's tiny KL weight the log-variance then falls only by about lr per step; starting it low lets
    the reconstruction learn at once (shapes, MSE loss: 25 dB held-out PSNR after 200 steps at -8, 18 dB at 0).
    """
    conv = model.encoder[-1]            # (mean, logvar) = its output chunked in two along channels
    conv.bias[model.config.latent_channels:] = logvar


class AutoencoderTrainer(skeleton.Trainer):
    """The KL autoencoder on reconstruction + KL; each save measures held-out PSNR, the last the latent scale."""

    desc = "train-autoencoder"
    window_keys = ("loss", "rec", "kl", "grad_norm")
    gan_keys = ("g_loss", "adaptive_weight", "d_loss", "logits_real", "logits_fake")
    resumable = RESUMABLE_CHANGES
    config_on_resume = False    # on resume config.json changes only with the next save, beside its weights

    def __init__(self, cfg: AutoencoderRunConfig, evaluator: ReconstructionEvaluator):
        self.cfg, self.evaluator = cfg, evaluator
        self.source, self.scale, self.psnr = None, None, None
        self.adversary: Adversary | None = None
        if cfg.autoencoder.adversarial_weight > 0:
            self.window_keys = (*self.window_keys, *self.gan_keys)

    def read_config(self, folder: Path) -> AutoencoderRunConfig:
        return read_autoencoder_config(folder)

    def make_model(self, device: torch.device) -> KLAutoencoder:
        model = KLAutoencoder(self.cfg.autoencoder).to(device)
        if self.cfg.train.logvar_init is not None:
            init_posterior_logvar(model, self.cfg.train.logvar_init)
        if self.cfg.autoencoder.adversarial_weight > 0:
            # built after the autoencoder, so the autoencoder starts from the same weights as without it
            tc = self.cfg.train
            self.adversary = Adversary(self.cfg.autoencoder, device, tc.precision, tc.weight_decay)
        return model

    def state(self, run: skeleton.Run) -> dict:
        return self.adversary.state_dict() if self.adversary is not None else {}

    def load_state(self, run: skeleton.Run, state: dict, where: str) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state, where)

    def metadata(self) -> dict[str, str]:
        return weights_metadata(self.cfg.autoencoder, self.scale)

    def step_fn(self, run: skeleton.Run):
        tc, model = self.cfg.train, run.model

        def step_fn(step: int, g: torch.Generator) -> dict:
            x = self.source.batch(step).images
            run.opt.zero_grad(set_to_none=True)
            gan = self.adversary is not None and self.adversary.active(step)
            with autocast(run.device, tc.precision):
                loss, rec, kl, x_rec = model.loss_terms(x, g)
                if gan:
                    term, g_loss, lam = self.adversary.generator_term(rec, x_rec, model.last_layer)
                    loss = loss + term
            loss_value = loss.item()
            check_loss(loss_value)
            run.scaler.scale(loss).backward()
            grad_norm = clip_and_step(model, run.opt, run.scaler, tc.grad_clip)
            run.ema.update(model)
            numbers = {"loss": loss_value, "rec": rec.item(), "kl": kl.item(), "grad_norm": grad_norm}
            if gan:
                numbers.update(g_loss=g_loss.item(), adaptive_weight=lam.item(),
                               **self.adversary.discriminator_step(x, x_rec, run.opt.param_groups[0]["lr"],
                                                                   tc.grad_clip))
            return numbers
        return step_fn

    def before_save(self, run: skeleton.Run, step: int, last: bool) -> None:
        """Held-out PSNR and the grid of the EMA weights (and at the end the latent scale), recorded first:
        a kill before the save drops the record on resume (metrics past the saved step are dropped)."""
        ema_model = run.ema.model.eval()
        if last:
            self.scale = self.evaluator.scaling_factor(ema_model)
            self.cfg = replace(self.cfg, autoencoder=replace(self.cfg.autoencoder, scaling_factor=self.scale))
        self.psnr = self.evaluator.psnr(ema_model)
        self.evaluator.grid(ema_model, run.run_dir / GRID_FILE)
        run.tracker.log(step, {"heldout_psnr": self.psnr, **({"scaling_factor": self.scale} if last else {})})


def _train(cfg: AutoencoderRunConfig, run_dir: Path, resume: bool, progress: bool, device: torch.device,
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
    trainer = AutoencoderTrainer(cfg, ReconstructionEvaluator(cfg, train_set.images, held_set.images))
    state = skeleton.open_run(trainer, run_dir, resume, Dist(), run_dir)
    run = skeleton.build(trainer, run_dir, Dist(), device, run_dir, state)
    saved_scale = run.ema_metadata.get("scaling_factor")
    if saved_scale is not None and run.start >= tc.steps:
        return _already_finished(trainer, run, held_desc, float(saved_scale))
    trainer.source = BatchSource(train_set, tc.batch_size, tc.seed, device=device)
    run.batches_per_epoch = trainer.source.order.batches_per_epoch
    skeleton.fit(trainer, run, progress)
    if run.start >= tc.steps:       # resumed past its end without a final save: make it now
        skeleton.save(trainer, run, run.start, last=True)
    run.ema.model.config = trainer.cfg.autoencoder
    return AutoencoderTrainResult(run_dir, max(run.start, tc.steps), run.start, run.last_loss, trainer.psnr,
                                  held_desc, trainer.scale, run.elapsed(), trainer.cfg, run.model, run.ema.model)


def _already_finished(trainer: AutoencoderTrainer, run: skeleton.Run, held_desc: str,
                      scale: float) -> AutoencoderTrainResult:
    """A resumed run that had already ended: nothing to train or write."""
    cfg = trainer.cfg
    final = replace(cfg, autoencoder=replace(cfg.autoencoder, scaling_factor=scale))
    value = trainer.evaluator.psnr(run.ema.model)      # as the final save measured it: with the neutral scale
    run.ema.model.config = final.autoencoder
    return AutoencoderTrainResult(run.run_dir, run.start, run.start, None, value, held_desc, scale,
                                  run.elapsed_before, final, run.model, run.ema.model)
