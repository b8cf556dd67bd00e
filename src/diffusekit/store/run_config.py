"""A diffusion run's config.json: `RunConfig`, its migration from earlier versions, reading it.

A run (DESIGN.md, "Run directory") is config.json + model.safetensors (EMA) + model_raw.safetensors
+ trainer_state.pt (+ samples/, metrics.jsonl, loss.png). `RunConfig` has four sections: `model`
(the UNet, which owns `prediction_type`), `schedule`, `data` and `train`,
plus `latent` and `text` for latent and text-to-image runs. `train` is `TrainConfig`, which extends
the skeleton's BaseTrainConfig (store/train_config.py). Options are resolved into it by
training.resolve; store.run loads a run's model and checks its weights against this config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.data import DataConfig
from diffusekit.nn.layout import derive_unet_config
from diffusekit.nn.text import TextEncoderConfig
from diffusekit.nn.unet import UNetConfig
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import ZERO_SNR_EPSILON, ScheduleConfig
from diffusekit.store.journal import CONFIG_FILE
from diffusekit.store.readers import read_config_json
from diffusekit.store.train_config import BaseTrainConfig

# fields that may change when resuming (they do not alter the optimisation up to the old end)
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.sample_every", "train.device",
                     "train.checkpoints_total_limit", "train.report_to", "train.eval_every", "train.eval_samples",
                     "train.num_workers")
# 28x28: the lean network (as many parameters as mnist28, half its FLOPs) trained to lower FD per CPU-minute
# on MNIST and Fashion-MNIST (docs/BENCHMARKS.md, "Fashion-MNIST: the default 28x28 network"); --preset mnist28
PRESET_FOR_SIZE = {8: "tiny8", 16: "small16", 28: "mnist28-lean", 32: "cifar32", 64: "64"}
# on a CPU, where DDPM's 38M-parameter CIFAR layout trains at a few images a second, 32x32 gets the
# 6.5M-parameter cifar32-lean (docs/BENCHMARKS.md, "32x32 colour on a CPU"); --preset cifar32 on any device
CPU_PRESET_FOR_SIZE = {32: "cifar32-lean"}


@dataclass
class TrainConfig(BaseTrainConfig):
    """Optimisation, EMA, precision and logging of a diffusion run. Defaults suit 8x8 digits on a 2-core CPU.

    With the tiny8 UNet on digits, the defaults give recognisable class-conditional digits by step
    1000 (loss ~0.07); 2000 steps take about 2-5 minutes on a 2-core CPU.
    """

    steps: int = 2000
    batch_size: int = 64                # global batch (split across torchrun ranks)
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0          # Hang et al. 2023
    channels_last: bool = False
    compile: Literal["auto", "on", "off"] = "auto"   # torch.compile the UNet; auto: where measured to pay (fastpath)
    class_dropout: float = 0.1          # prob. of the null label (for CFG); ignored by unconditional models
    caption_dropout: float = 0.1        # prob. of the empty prompt "" (for CFG); text-conditioned runs only
    grad_accum: int = 1                 # micro-batches per step (batch_size / grad_accum images each)
    num_workers: int = 0                # DataLoader workers for streamed image folders
    checkpoints_total_limit: int = 2    # newest checkpoint-STEP/ folders kept (hard links, cheap); 0 = every one
    report_to: Literal["none", "tensorboard", "wandb"] = "none"   # metrics.jsonl always; TensorBoard or W&B too
    eval_every: int = 0                 # FD/KID of eval_samples against the training data every N steps; 0 = never
    eval_samples: int = 256
    sample_every: int = 500             # also at the last step; 0 = never
    num_sample_images: int = 100
    sample_sampler: str = "dpmpp_2m"
    sample_steps: int = 25

    def validate(self) -> None:
        super().validate()
        for name in ("num_sample_images", "sample_steps", "grad_accum", "eval_samples"):
            check_range(name, getattr(self, name), lo=1)
        for name in ("sample_every", "num_workers", "checkpoints_total_limit", "eval_every"):
            check_range(name, getattr(self, name), lo=0)
        check_range("min_snr_gamma", self.min_snr_gamma, lo=0, lo_open=True)
        check_range("class_dropout", self.class_dropout, lo=0, hi=1, hi_open=True)
        check_range("caption_dropout", self.caption_dropout, lo=0, hi=1, hi_open=True)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must split into grad_accum={self.grad_accum} equal "
                              f"micro-batches; use a batch size that is a multiple of {self.grad_accum}.")
        if self.sample_sampler not in SAMPLERS:
            raise ConfigError(f"sample_sampler={self.sample_sampler!r} is not a sampler; choose one of "
                              f"{sorted(SAMPLERS)}.")


@dataclass
class LatentConfig(Config):
    """Diffusion in an autoencoder's latent space (Rombach et al. 2022, "LDM"): what the run encodes with."""

    autoencoder: str = ""          # the autoencoder folder it was trained with (a copy is kept in RUN/autoencoder)
    image_size: int = 32           # side of the pixel images the autoencoder sees
    channels: int = 3              # channels of the pixel images

    def validate(self) -> None:
        if not self.autoencoder:
            raise ConfigError("latent.autoencoder is empty; give --autoencoder PATH (a `diffusekit "
                              "train-autoencoder` folder or a diffusers AutoencoderKL folder).")
        check_range("image_size", self.image_size, lo=1)
        check_range("channels", self.channels, lo=1)


@dataclass
class RunConfig(Config):
    """Everything a run needs: model, noise schedule, data and training. Saved as config.json."""

    model: UNetConfig = field(default_factory=lambda: UNetConfig.preset("tiny8", num_classes=10))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_names: list[str] = field(default_factory=list)   # filled from the data when training starts
    latent: LatentConfig | None = None                     # set: the UNet denoises autoencoder latents
    text: TextEncoderConfig | None = None                  # set: the UNet is conditioned on captions

    def validate(self) -> None:
        m, d = self.model, self.data
        if self.text is not None and m.text_conditioning == "none":
            raise ConfigError("a text encoder is set but model.text_conditioning='none'; choose "
                              "'cross_attention', 'multiply' or 'both'.")
        if self.schedule.rescale_zero_terminal_snr and m.prediction_type == "epsilon":
            raise ConfigError(ZERO_SNR_EPSILON)
        if self.latent is not None:
            return                  # the model sees latents: the data's pixel size is checked by check_data_fits
        if d.image_size and d.image_size != m.image_size:
            raise ConfigError(f"data.image_size={d.image_size} but model.image_size={m.image_size}; "
                              f"set both to the same size.")
        if d.channels and d.channels != m.in_channels:
            raise ConfigError(f"data.channels={d.channels} but model.in_channels={m.in_channels}; "
                              f"set model.in_channels={d.channels} (or convert the data).")
        if self.class_names and m.num_classes and len(self.class_names) != m.num_classes:
            raise ConfigError(f"class_names lists {len(self.class_names)} classes but model.num_classes="
                              f"{m.num_classes}; make them agree.")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return super().from_dict(_migrate(d))


def _migrate(d: dict) -> dict:
    """Read config.json files of earlier versions: prediction_type moved from train to model, and
    train.mixed_precision ("no" | "bf16") became train.precision ("fp32" | "bf16" | "fp16")."""
    if not isinstance(d, dict):
        raise ConfigError(f"a run config must be a JSON object with sections model/schedule/data/train; got "
                          f"{type(d).__name__}.")
    d = dict(d)
    train = d.get("train")
    if isinstance(train, dict) and ("prediction_type" in train or "mixed_precision" in train):
        train = dict(train)
        if "prediction_type" in train:
            model = dict(d.get("model") or {})
            model.setdefault("prediction_type", train.pop("prediction_type"))
            d["model"] = model
        if "mixed_precision" in train:
            train.setdefault("precision", {"no": "fp32"}.get(train["mixed_precision"], train["mixed_precision"]))
            train.pop("mixed_precision")
        d["train"] = train
    return d


# ---------------------------------------------------------------------------------------------
# resolving options into a config


def check_data_fits(cfg: RunConfig, data) -> None:
    """Raise ConfigError if the loaded images, labels or captions do not fit the model config."""
    m = cfg.model
    size, channels = (cfg.latent.image_size, cfg.latent.channels) if cfg.latent else (m.image_size, m.in_channels)
    what = "the autoencoder's input" if cfg.latent else "model"
    if data.image_size != size:
        raise ConfigError(f"the data holds {data.image_size}x{data.image_size} images but {what} is {size}x{size}; "
                          f"set --image-size {size} to resize the images (or train a model for this size).")
    if data.channels != channels:
        raise ConfigError(f"the data has {data.channels} channel(s) but {what} takes {channels}; "
                          f"convert the images with --channels {channels}.")
    if m.num_classes and data.labels is None:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data has no labels; set "
                          f"model.num_classes=0 for an unconditional model, or use labelled data.")
    if m.num_classes and m.num_classes != data.num_classes:
        raise ConfigError(f"the data has {data.num_classes} classes but model.num_classes={m.num_classes}; "
                          f"set model.num_classes={data.num_classes} (or 0 to ignore the labels).")
    if cfg.text is not None and getattr(data, "captions", None) is None:
        raise ConfigError(f"text conditioning needs captions, and {data.source or 'the data'} has none; give an "
                          f"image folder with a metadata.jsonl 'text' column or .txt files, or --data shapes.")
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"the data holds {len(data)} images, fewer than batch_size={cfg.train.batch_size}; "
                          f"set batch_size to at most {len(data)}.")


def default_preset(image_size: int, device_type: str = "cpu") -> str | None:
    """The preset a new run of this image (or latent) size gets on a device of this type ("cpu", "cuda",
    "mps"), or None where the layout is derived (nn.layout.derive_unet_config)."""
    if device_type == "cpu" and image_size in CPU_PRESET_FOR_SIZE:
        return CPU_PRESET_FOR_SIZE[image_size]
    return PRESET_FOR_SIZE.get(image_size)


def model_config(image_size: int, channels: int, num_classes: int, preset: str | None = None,
                 device_type: str = "cuda", **overrides) -> UNetConfig:
    """The UNet for images (or latents) of this size: a named preset, the preset of the size on this
    device type (`default_preset`), or a layout derived for any size from 8 to 256
    (nn.layout.derive_unet_config)."""
    name = preset or default_preset(image_size, device_type)
    base = {"image_size": image_size, "in_channels": channels, "num_classes": num_classes, **overrides}
    if name is None:
        return derive_unet_config(**base)
    return UNetConfig.preset(name, **base)


def resume_conflicts(saved: RunConfig, wanted: RunConfig) -> dict[str, tuple]:
    """Fields that differ between a run's saved config and the one asked for, beyond RESUMABLE_CHANGES."""
    return {k: v for k, v in saved.diff(wanted).items() if k not in RESUMABLE_CHANGES}


# ---------------------------------------------------------------------------------------------
# reading and loading a run


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig in run_dir/config.json; errors name the file and any unknown key."""
    path = Path(run_dir) / CONFIG_FILE
    data = read_config_json(run_dir)
    try:
        return RunConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def read_config_file(path: str | Path) -> RunConfig:
    """A RunConfig from a JSON file given by the user (--config); errors name the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file ({e.reason} at byte {e.start}); give a JSON run config, "
                          f"such as a run's config.json.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix it, or "
                          f"start from a run's config.json (`diffusekit train ... --dry-run` prints one).") from e
    try:
        return RunConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def weights_metadata(cfg: RunConfig) -> dict[str, str]:
    """What a checkpoint records about its meaning, checked by load_run: model shape (with the
    prediction type) and the noise schedule."""
    return {"model_config": json.dumps(cfg.model.to_dict()), "prediction_type": cfg.model.prediction_type,
            "schedule_config": json.dumps(cfg.schedule.to_dict())}


