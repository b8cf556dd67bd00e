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

from . import checkpoint as ckpt
from .config import Config, ConfigError, check_range
from .data import DataConfig, ImageDataset, load_dataset
from .device import DeviceChoice, Precision
from .nn.unet import UNet, UNetConfig
from .schedule import ScheduleConfig

# fields that may change when resuming (they do not alter the optimisation up to the old end)
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.sample_every", "train.device")
PRESET_FOR_SIZE = {8: "tiny8", 16: "small16", 28: "mnist28", 32: "cifar32", 64: "64"}


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
    precision: Precision = "fp32"       # bf16 / fp16: autocast of the model call (fp16 adds a grad scaler)
    channels_last: bool = False
    class_dropout: float = 0.1          # prob. of the null label (for CFG); ignored by unconditional models
    seed: int = 0
    device: DeviceChoice = "auto"       # auto: CUDA, then MPS, then CPU
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
        from .samplers import SAMPLERS
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


def model_for_data(dataset: ImageDataset, preset: str | None = None, **overrides) -> UNetConfig:
    """The UNet for a data set: a named preset, or the preset of its image size; its channels and classes."""
    size = dataset.image_size
    name = preset or PRESET_FOR_SIZE.get(size)
    if name is None:
        raise ConfigError(f"no UNet preset for {size}x{size} images (presets: {sorted(PRESET_FOR_SIZE)}); "
                          f"resize the images to one of those sizes with --image-size, or give --config.")
    return UNetConfig.preset(name, **{"image_size": size, "in_channels": dataset.channels,
                                      "num_classes": dataset.num_classes if dataset.labels is not None else 0,
                                      **overrides})


def default_run_config(data: DataConfig | None = None, dataset: ImageDataset | None = None,
                       **train_overrides) -> RunConfig:
    """A RunConfig for the data: the UNet preset of its image size, its channels and classes."""
    data = data or DataConfig()
    dataset = dataset if dataset is not None else load_dataset(data)
    return RunConfig(model=model_for_data(dataset), data=data, train=TrainConfig(**train_overrides),
                     class_names=list(dataset.class_names) if dataset.labels is not None else [])


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
    sections: dict[str, dict] = {"model": {}, "schedule": {}, "data": {}, "train": {}}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"option {key!r} must be section.field with section one of {sorted(sections)}.")
        sections[section][name] = value
    dataset = None
    if base is None:
        data_cfg = _apply(DataConfig(), "data", sections["data"])
        dataset = load_dataset(data_cfg)
        model = model_for_data(dataset, preset, **sections["model"])
        cfg = RunConfig(model=model, data=data_cfg,
                        class_names=list(dataset.class_names) if dataset.labels is not None else [])
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
             weights: Literal["ema", "raw"] = "ema") -> tuple[RunConfig, UNet, dict[str, Any]]:
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
    model = UNet(cfg.model)
    ckpt.load_state_dict_checked(model, state_dict, str(path),
                                 hint=f"Check the model section of {run_dir / ckpt.CONFIG_FILE}.")
    extra = {"step": int(meta["step"]) if "step" in meta else None, "class_names": list(cfg.class_names),
             "weights_path": path, "metadata": meta}
    return cfg, model.to(device).eval(), extra
