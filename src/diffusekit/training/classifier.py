"""The classifier trainer: the (noise-aware) judge of sample quality and guide of classifier guidance.

`train_classifier(data_cfg, run_dir)` trains a `NoiseAwareClassifier` with cross-entropy on the
one training skeleton (training.skeleton: lock, resume, precision, EMA, per-step seeds, logging,
journaled saves) and writes the standard run folder (config.json, model.safetensors (EMA),
model_raw.safetensors, trainer_state.pt, metrics.jsonl, loss.png) and, when training ends,
  run_dir/classifier.safetensors     the trained weights (metadata: classifier_config, noise_aware, step)
  run_dir/metrics.json               held-out accuracy (clean, and at several t when noise-aware)
A classifier whose FD view is "levels" (nn.classifier) has its feature blocks calibrated on up to
CALIBRATION_IMAGES clean training images (a seeded draw) before it is saved.
`store.classifier.load_classifier(path)` reads them back. With noise_aware=True every image is
noised to a random timestep of the schedule first, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, so
that the classifier gives log p(y | x_t, t) for guidance (Dhariwal & Nichol 2021, sec. 4.1);
otherwise it sees clean images (t = 0) and serves as the judge of generated samples.

Held-out accuracy is measured on the IDX test split (t10k) when the data is a folder of IDX files,
otherwise on a seeded random 10% kept out of training.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, DataOrder, ImageDataset, load_dataset, split_heldout
from diffusekit.device import autocast, check_precision, rank_world, resolve_device
from diffusekit.nn.classifier import ClassifierConfig, NoiseAwareClassifier
from diffusekit.schedule import NoiseSchedule, ScheduleConfig
from diffusekit.seeding import derive_seed
from diffusekit.store import read_config_json, write_text_atomic
from diffusekit.store.classifier import (ClassifierRunConfig, ClassifierTrainConfig, default_classifier_config,
                                         save_classifier)
from diffusekit.training import skeleton
from diffusekit.training.loop import check_loss, clip_and_step
from diffusekit.training.processes import Dist

METRICS_FILE = "metrics.json"
CALIBRATION_IMAGES = 5000      # clean training images that set the "levels" view's block scales
# fields that may change on resume: they do not alter the optimisation up to the old end
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.device", "train.eval_batch_size")


@dataclass
class ClassifierTrainResult:
    """What `train_classifier` returns."""
    run_dir: Path
    model: NoiseAwareClassifier        # in eval mode
    config: ClassifierRunConfig
    accuracy: float                    # held-out accuracy on clean images
    metrics: dict                      # what metrics.json holds
    seconds: float


# ---------------------------------------------------------------------------------------------
# data


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels in each direction, filling with the border value -1."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device)[None])          # (B, H)
    cols = (dx[:, None] + torch.arange(W, device=x.device)[None])          # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    # (B, C, H+2s, W+2s) -> (B, H, W, C) by advanced indexing -> (B, C, H, W)
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def heldout_accuracy(model: NoiseAwareClassifier, images: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = 500, schedule: NoiseSchedule | None = None, t: int = 0,
                     seed: int = 0) -> float:
    """Share of images classified correctly, optionally after noising them to timestep t."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(derive_seed(seed, "eval-noise", t))
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = x.to(device)
        tt = None
        if schedule is not None and t > 0:
            tt = torch.full((x.shape[0],), t, device=device)
            x = schedule.add_noise(x, torch.randn(x.shape, generator=g, device=device), tt)
        correct += int((model(x, tt).argmax(1).cpu() == y).sum())
    model.train(was_training)
    return correct / len(labels)


def train_classifier(data_cfg: DataConfig, run_dir: str | Path, classifier_cfg: ClassifierConfig | None = None,
                     train_cfg: ClassifierTrainConfig | None = None, schedule_cfg: ScheduleConfig | None = None,
                     progress: bool = True, resume: bool = False) -> ClassifierTrainResult:
    """Train a classifier on the labelled data and write run_dir (see the module docstring).

    classifier_cfg: None = `default_classifier_config` for the data's size, channels and classes.
    schedule_cfg: overrides train_cfg.schedule (pass a diffusion run's schedule for guidance).
    resume=True continues the checkpoint in run_dir; resume=False refuses a folder that holds one.
    The caller's global RNG state is left as it was. One process only.
    """
    if rank_world()[1] > 1:
        raise ConfigError("train_classifier runs in one process; start it without torchrun (WORLD_SIZE=1).")
    tc = train_cfg or ClassifierTrainConfig()
    if schedule_cfg is not None:
        tc = dataclasses.replace(tc, schedule=schedule_cfg)
    device = resolve_device(tc.device)
    check_precision(tc.precision, device)
    run_dir = Path(run_dir)
    skeleton.create_folder(run_dir, data_cfg.source)
    dataset = load_dataset(data_cfg)
    cfg = ClassifierRunConfig(_classifier_for(dataset, data_cfg, classifier_cfg), data_cfg, tc,
                              list(dataset.class_names))
    with skeleton.locked(run_dir, Dist(), device):
        return _train(cfg, dataset, run_dir, device, progress, resume)


def _classifier_for(dataset: ImageDataset, data_cfg: DataConfig, ccfg: ClassifierConfig | None) -> ClassifierConfig:
    """The classifier config (given, or the judge preset for the data), checked against the data."""
    if dataset.labels is None:
        raise ConfigError(f"{data_cfg.source} has no labels (class_labels={data_cfg.class_labels}); a classifier "
                          f"needs labelled data: set class_labels=True, or use class sub-folders / IDX labels.")
    ccfg = ccfg or default_classifier_config(dataset.image_size, dataset.channels, dataset.num_classes)
    if (ccfg.image_size, ccfg.in_channels) != (dataset.image_size, dataset.channels):
        raise ConfigError(f"the data holds {dataset.channels}x{dataset.image_size}x{dataset.image_size} images "
                          f"but the classifier expects {ccfg.in_channels}x{ccfg.image_size}x{ccfg.image_size}; "
                          f"set classifier image_size/in_channels (or data.image_size/channels) to match.")
    if ccfg.num_classes != dataset.num_classes:
        raise ConfigError(f"the data has {dataset.num_classes} classes but num_classes={ccfg.num_classes}; "
                          f"set num_classes={dataset.num_classes}.")
    return ccfg


class ClassifierTrainer(skeleton.Trainer):
    """The classifier on cross-entropy, on clean images or (noise-aware) on x_t at a random t."""

    desc = "train-classifier"
    window_keys = ("loss", "acc")
    resumable = RESUMABLE_CHANGES

    def __init__(self, cfg: ClassifierRunConfig, train_set: ImageDataset):
        self.cfg, self.train_set, self.last = cfg, train_set, {}
        self.schedule = NoiseSchedule.from_config(cfg.train.schedule) if cfg.train.noise_aware else None

    def read_config(self, folder: Path) -> ClassifierRunConfig:
        return ClassifierRunConfig.from_dict(read_config_json(folder))

    def make_model(self, device: torch.device) -> NoiseAwareClassifier:
        return NoiseAwareClassifier(self.cfg.classifier).to(device)

    def metadata(self) -> dict[str, str]:
        return {"classifier_config": json.dumps(self.cfg.classifier.to_dict()),
                "noise_aware": str(self.cfg.train.noise_aware)}

    def step_fn(self, run: skeleton.Run):
        tc, device, model, schedule = self.cfg.train, run.device, run.model, self.schedule
        images, labels = self.train_set.images.to(device), self.train_set.labels.to(device)
        order = DataOrder(len(self.train_set), tc.batch_size, tc.seed)
        run.batches_per_epoch = order.batches_per_epoch

        def step_fn(step: int, g: torch.Generator) -> dict:
            idx = order.batch(step).to(device)
            x, y = random_shift(images[idx], tc.max_shift, g), labels[idx]
            t = None
            if schedule is not None:
                # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at a random t (noise-aware, Dhariwal & Nichol sec. 4.1)
                t = torch.randint(0, schedule.num_train_timesteps, (x.shape[0],), generator=g, device=device)
                x = schedule.add_noise(x, torch.randn(x.shape, generator=g, device=device), t)
            with autocast(device, tc.precision):
                logits = model(x, t)
                loss = F.cross_entropy(logits.float(), y)
            check_loss(loss.item())
            run.opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            grad_norm = clip_and_step(model, run.opt, run.scaler, tc.grad_clip)
            run.ema.update(model)
            self.last = {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
            return {**self.last, "grad_norm": grad_norm}
        return step_fn


def calibrate(model: NoiseAwareClassifier, train_set: ImageDataset, seed: int) -> torch.Tensor | None:
    """Calibrate a "levels" classifier's feature blocks on a seeded draw of clean training images; returns
    the block divisors (None for the "pooled" view, which has none)."""
    if model.config.features != "levels":
        return None
    g = torch.Generator().manual_seed(derive_seed(seed, "feature-calibration"))
    idx = torch.randperm(len(train_set), generator=g)[:CALIBRATION_IMAGES]
    return model.calibrate_features(train_set.images[idx])


def _train(cfg: ClassifierRunConfig, dataset: ImageDataset, run_dir: Path, device: torch.device,
           progress: bool, resume: bool) -> ClassifierTrainResult:
    tc = cfg.train
    train_set, held_set, held_desc = split_heldout(cfg.data, dataset, tc.heldout_fraction, tc.seed)
    if len(train_set) < tc.batch_size:
        raise ConfigError(f"{len(train_set)} training images, fewer than batch_size={tc.batch_size}; "
                          f"set batch_size to at most {len(train_set)}.")
    trainer = ClassifierTrainer(cfg, train_set)
    state = skeleton.open_run(trainer, run_dir, resume, Dist(), run_dir)
    run = skeleton.build(trainer, run_dir, Dist(), device, run_dir, state)
    skeleton.fit(trainer, run, progress)
    model = run.model.eval()
    scale = calibrate(model, train_set, tc.seed)
    accuracy = heldout_accuracy(model, held_set.images, held_set.labels, tc.eval_batch_size)
    metrics = {"heldout_accuracy": accuracy, "heldout": held_desc, "heldout_n": len(held_set),
               "train_n": len(train_set), "steps": tc.steps, "final_loss": trainer.last.get("loss"),
               "train_seconds": run.elapsed(), "noise_aware": tc.noise_aware, "num_parameters": model.num_parameters(),
               "features": cfg.classifier.features, "num_features": model.num_features}
    if scale is not None:
        metrics["feature_scale"] = [float(v) for v in scale]
    if trainer.schedule is not None:
        T = trainer.schedule.num_train_timesteps
        metrics["heldout_accuracy_at_t"] = {
            str(t): heldout_accuracy(model, held_set.images, held_set.labels, tc.eval_batch_size, trainer.schedule,
                                     t, tc.seed)
            for t in sorted({0, T // 4, T // 2, 3 * T // 4, T - 1})}
    save_classifier(run_dir, model, cfg, step=max(run.start, tc.steps))
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return ClassifierTrainResult(run_dir, model, cfg, accuracy, metrics, run.elapsed())
