"""The run directory as one concept: its config, resolving options into it, writing, reading and loading it.

A run (DESIGN.md, "Run directory") is config.json + model.safetensors (EMA) + model_raw.safetensors
+ trainer_state.pt (+ samples/, metrics.jsonl, loss.png). `RunConfig` has four sections: `model`
(the UNet, which owns `prediction_type`), `schedule`, `data` and `train`. The CLI and the library
resolve options the same way (`resolve_run_config`), and `load_run` checks the weights' metadata
against config.json (model shape, prediction type, classes, schedule) before building anything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from . import store as ckpt
from .config import Config, ConfigError, check_range
from .data import DataConfig, ImageDataset, load_dataset
from .device import DeviceChoice, Precision
from .nn.text import TextEncoderConfig
from .nn.unet import UNetConfig
from .schedule import ScheduleConfig

# fields that may change when resuming (they do not alter the optimisation up to the old end)
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.sample_every", "train.device",
                     "train.checkpoints_total_limit", "train.report_to", "train.eval_every", "train.eval_samples",
                     "train.num_workers")
# 28x28: the lean network (as many parameters as mnist28, half its FLOPs) trained to lower FD per CPU-minute
# on MNIST and Fashion-MNIST (docs/BENCHMARKS.md, "Fashion-MNIST: the default 28x28 network"); --preset mnist28
PRESET_FOR_SIZE = {8: "tiny8", 16: "small16", 28: "mnist28-lean", 32: "cifar32", 64: "64"}


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
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0          # Hang et al. 2023
    precision: Precision = "auto"       # auto (bf16 where native, else fp32) / fp32 / bf16 / fp16 (adds a grad scaler)
    channels_last: bool = False
    compile: Literal["auto", "on", "off"] = "auto"   # torch.compile the UNet; auto: where measured to pay (fastpath)
    class_dropout: float = 0.1          # prob. of the null label (for CFG); ignored by unconditional models
    caption_dropout: float = 0.1        # prob. of the empty prompt "" (for CFG); text-conditioned runs only
    grad_accum: int = 1                 # micro-batches per step (batch_size / grad_accum images each)
    num_workers: int = 0                # DataLoader workers for streamed image folders
    seed: int = 0
    device: DeviceChoice = "auto"       # auto: CUDA, then MPS, then CPU
    log_every: int = 50
    save_every: int = 500               # also at the last step
    checkpoints_total_limit: int = 2    # newest checkpoint-STEP/ folders kept (hard links, cheap); 0 = every one
    report_to: Literal["none", "tensorboard"] = "none"   # metrics.jsonl always; TensorBoard too on request
    eval_every: int = 0                 # FD/KID of eval_samples against the training data every N steps; 0 = never
    eval_samples: int = 256
    sample_every: int = 500             # also at the last step; 0 = never
    num_sample_images: int = 100
    sample_sampler: str = "dpmpp_2m"
    sample_steps: int = 25

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "num_sample_images", "sample_steps",
                     "grad_accum", "eval_samples"):
            check_range(name, getattr(self, name), lo=1)
        for name in ("warmup_steps", "sample_every", "seed", "num_workers", "checkpoints_total_limit", "eval_every"):
            check_range(name, getattr(self, name), lo=0)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("weight_decay", self.weight_decay, lo=0)
        check_range("grad_clip", self.grad_clip, lo=0)
        check_range("ema_decay", self.ema_decay, lo=0, hi=1, hi_open=True)
        check_range("min_snr_gamma", self.min_snr_gamma, lo=0, lo_open=True)
        check_range("class_dropout", self.class_dropout, lo=0, hi=1, hi_open=True)
        check_range("caption_dropout", self.caption_dropout, lo=0, hi=1, hi_open=True)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must split into grad_accum={self.grad_accum} equal "
                              f"micro-batches; use a batch size that is a multiple of {self.grad_accum}.")
        from .samplers import SAMPLERS
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
        from .schedule import ZERO_SNR_EPSILON
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


def model_config(image_size: int, channels: int, num_classes: int, preset: str | None = None,
                 **overrides) -> UNetConfig:
    """The UNet for images (or latents) of this size: a named preset, the preset of the size, or a
    layout derived for any size from 8 to 256 (nn.layout.derive_unet_config)."""
    name = preset or PRESET_FOR_SIZE.get(image_size)
    base = {"image_size": image_size, "in_channels": channels, "num_classes": num_classes, **overrides}
    if name is None:
        from .nn.layout import derive_unet_config
        return derive_unet_config(**base)
    return UNetConfig.preset(name, **base)


def model_for_data(dataset, preset: str | None = None, **overrides) -> UNetConfig:
    """The UNet for a data set: its image size, channels and classes."""
    return model_config(dataset.image_size, dataset.channels,
                        dataset.num_classes if dataset.labels is not None else 0, preset, **overrides)


def default_run_config(data: DataConfig | None = None, dataset: ImageDataset | None = None,
                       **train_overrides) -> RunConfig:
    """A RunConfig for the data: the UNet of its image size, its channels and classes."""
    data = data or DataConfig()
    dataset = dataset if dataset is not None else load_dataset(data)
    return RunConfig(model=model_for_data(dataset), data=data, train=TrainConfig(**train_overrides),
                     class_names=list(dataset.class_names) if dataset.labels is not None else [])


def _text_config(options: dict, dataset) -> TextEncoderConfig:
    """The text encoder for the data's captions: a learned one gets its vocab from them."""
    from .nn.text import build_vocab
    cfg = TextEncoderConfig(**{"path": "minilm" if options.get("kind") == "pretrained" else "", **options})
    if getattr(dataset, "captions", None) is None:
        raise ConfigError(f"text conditioning needs captions, and {dataset.source or 'the data'} has none; give an "
                          f"image folder with a metadata.jsonl 'text' column or .txt files, or --data shapes.")
    if cfg.kind == "learned" and not cfg.vocab:
        cfg = replace(cfg, vocab=tuple(build_vocab(dataset.captions)))
    return cfg


def _text_dim(cfg: TextEncoderConfig) -> int:
    if cfg.kind == "learned":
        return cfg.dim
    from .nn.text import build_text_encoder
    return build_text_encoder(cfg).dim


def _apply(cfg: Config, section: str, values: dict) -> Config:
    fields = {f for f in cfg.to_dict()}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown option {section}.{key}; {section} has {sorted(fields)}.")
    return replace(cfg, **values) if values else cfg


def resolve_run_config(overrides: dict[str, Any] | None = None, base: RunConfig | None = None,
                       preset: str | None = None) -> tuple[RunConfig, ImageDataset | None]:
    """A validated RunConfig from dotted options ({"data.source": "digits", "train.lr": 1e-3, ...}).

    Without `base`, the data is loaded and the model follows it (preset by image size, or `preset`);
    with `base` (a --config file or a run being resumed) the options are applied on top of it.
    Returns (config, the loaded data set or None), so a trainer need not load the data twice.
    """
    sections: dict[str, dict] = {"model": {}, "schedule": {}, "data": {}, "train": {}, "latent": {}, "text": {}}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"option {key!r} must be section.field with section one of {sorted(sections)}.")
        sections[section][name] = value
    dataset = None
    if base is None:
        from .data import open_dataset
        data_cfg = _apply(DataConfig(), "data", sections["data"])
        if data_cfg.image_size and not (preset or sections["latent"]) and data_cfg.image_size not in PRESET_FOR_SIZE:
            from .nn.layout import derive_unet_config
            derive_unet_config(data_cfg.image_size, 1)     # a size no UNet supports: refused before loading the data
        dataset = open_dataset(data_cfg)
        data_cfg = getattr(dataset, "config", None) or data_cfg          # channels resolved from the images
        latent, text, size, channels = None, None, dataset.image_size, dataset.channels
        if sections["latent"]:
            latent = LatentConfig(**{"image_size": size, "channels": channels, **sections["latent"]})
            from .autoencoder_train import load_autoencoder
            try:
                channels, size, _ = load_autoencoder(latent.autoencoder).latent_shape((channels, size, size))
            except ValueError as e:
                raise ConfigError(f"the autoencoder {latent.autoencoder} does not fit the data ({channels} channel(s), "
                                  f"{size}x{size}): {e} Train one on this data (diffusekit train-autoencoder --data "
                                  f"{data_cfg.source}), or convert the images with --channels / --image-size.") from e
        model_over = dict(sections["model"])
        num_classes = dataset.num_classes if dataset.labels is not None else 0
        if sections["text"]:
            text = _text_config(sections["text"], dataset)
            model_over = {"text_conditioning": "both", "context_dim": _text_dim(text), **model_over}
            num_classes = 0            # the captions condition the model, not class labels
            data_cfg = replace(data_cfg, class_labels=False)
        model = model_config(size, channels, num_classes, preset, **model_over)
        cfg = RunConfig(model=model, data=data_cfg, latent=latent, text=text,
                        class_names=list(dataset.class_names) if num_classes else [])
    else:
        cfg = replace(base, data=_apply(base.data, "data", sections["data"]))
        model = base.model
        if preset:
            model = UNetConfig.preset(preset, image_size=model.image_size, in_channels=model.in_channels,
                                      num_classes=model.num_classes, prediction_type=model.prediction_type)
        cfg = replace(cfg, model=_apply(model, "model", sections["model"]))
    cfg = replace(cfg, schedule=_apply(cfg.schedule, "schedule", sections["schedule"]),
                  train=_apply(cfg.train, "train", sections["train"]))
    return RunConfig.from_dict(cfg.to_dict()), dataset     # re-validate the combination


def resume_conflicts(saved: RunConfig, wanted: RunConfig) -> dict[str, tuple]:
    """Fields that differ between a run's saved config and the one asked for, beyond RESUMABLE_CHANGES."""
    return {k: v for k, v in saved.diff(wanted).items() if k not in RESUMABLE_CHANGES}


# ---------------------------------------------------------------------------------------------
# reading and loading a run


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig in run_dir/config.json; errors name the file and any unknown key."""
    path = Path(run_dir) / ckpt.CONFIG_FILE
    data = ckpt.read_config_json(run_dir)
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


def check_weights_metadata(cfg: RunConfig, meta: dict[str, str], path: Path, config_path: Path) -> None:
    """Raise CheckpointError naming every field where config.json and the weights' metadata disagree."""
    diffs: dict[str, tuple] = {}
    if "model_config" in meta:
        trained = UNetConfig.from_dict(_migrate_model(json.loads(meta["model_config"]), meta))
        diffs.update({f"model.{k}": v for k, v in cfg.model.diff(trained).items()})
    elif "prediction_type" in meta and meta["prediction_type"] != cfg.model.prediction_type:
        diffs["model.prediction_type"] = (cfg.model.prediction_type, meta["prediction_type"])
    if "schedule_config" in meta:
        trained_s = ScheduleConfig.from_dict(json.loads(meta["schedule_config"]))
        diffs.update({f"schedule.{k}": v for k, v in cfg.schedule.diff(trained_s).items()})
    if diffs:
        lines = "\n  ".join(f"{k}: config.json has {a!r}, the weights were trained with {b!r}"
                            for k, (a, b) in diffs.items())
        raise ckpt.CheckpointError(f"{path} does not match {config_path}:\n  {lines}\n"
                                   f"Restore config.json from the run, or set those fields back.")


def _migrate_model(model: dict, meta: dict) -> dict:
    # weights saved before prediction_type moved into the model section carry it beside model_config
    if "prediction_type" not in model and "prediction_type" in meta:
        model = {**model, "prediction_type": meta["prediction_type"]}
    return model


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             weights: Literal["ema", "raw"] = "ema") -> tuple[RunConfig, torch.nn.Module, dict[str, Any]]:
    """(config, model in eval mode, extra) of a run directory; EMA weights unless weights="raw".

    A reader never writes to the run (it may be training right now). extra: {"step", "class_names",
    "weights_path", "metadata"}. Errors name a missing file, the fields where config.json and the
    weights' metadata differ, or the mismatching keys.
    """
    run_dir = Path(run_dir)
    name = ckpt.EMA_FILE if weights == "ema" else ckpt.RAW_FILE
    # one committed save, read consistently even while a trainer writes the next one
    saved = ckpt.read_checkpoint(run_dir, weights=(name,))
    path = run_dir / name
    if saved.config is None:
        read_run_config(run_dir)            # raises the missing-file error with its hint
    try:
        cfg = RunConfig.from_dict(saved.config)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{run_dir / ckpt.CONFIG_FILE}: {e}") from e
    state_dict, meta = saved.weights[name]
    check_weights_metadata(cfg, meta, path, run_dir / ckpt.CONFIG_FILE)
    from .models import build_model
    model = build_model(cfg)
    ckpt.load_state_dict_checked(model, state_dict, str(path),
                                 hint=f"Check the model section of {run_dir / ckpt.CONFIG_FILE}.")
    extra = {"step": int(meta["step"]) if "step" in meta else None, "class_names": list(cfg.class_names),
             "weights_path": path, "metadata": meta}
    return cfg, model.to(device).eval(), extra
