"""Options -> a validated RunConfig: what `diffusekit train` (and any program) trains.

Resolution is two steps kept apart: first what the config must know about the inputs is read from
them (the data set is opened, a latent run's autoencoder is asked for its latent shape), then
`run_config_for` builds the config from the options and those facts, without touching any file.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from diffusekit.config import Config, ConfigError
from diffusekit.device import resolve_device
from diffusekit.data import DataConfig, ImageDataset, open_dataset
from diffusekit.nn.layout import derive_unet_config
from diffusekit.nn.text import TextEncoderConfig, build_text_encoder, build_vocab
from diffusekit.nn.unet import UNetConfig
from diffusekit.store.autoencoder import load_autoencoder
from diffusekit.store.run_config import PRESET_FOR_SIZE, LatentConfig, RunConfig, TrainConfig, model_config

SECTIONS = ("model", "schedule", "data", "train", "latent", "text")


def resolve_run_config(overrides: dict[str, Any] | None = None, base: RunConfig | None = None,
                       preset: str | None = None) -> tuple[RunConfig, ImageDataset | None]:
    """A validated RunConfig from dotted options ({"data.source": "digits", "train.lr": 1e-3, ...}).

    Without `base`, the data is opened and the model follows it (preset by image size and device type,
    store.run_config.default_preset, or `preset`);
    with `base` (a --config file or a run being resumed) the options are applied on top of it.
    Returns (config, the opened data set or None), so a trainer need not open the data twice.
    """
    sections = split_options(overrides or {})
    dataset = None
    if base is None:
        data_cfg = _apply(DataConfig(), "data", sections["data"])
        if data_cfg.image_size and not (preset or sections["latent"]) and data_cfg.image_size not in PRESET_FOR_SIZE:
            derive_unet_config(data_cfg.image_size, 1)     # a size no UNet supports: refused before loading the data
        dataset = open_dataset(data_cfg)
        data_cfg = getattr(dataset, "config", None) or data_cfg          # channels resolved from the images
        latent_shape = _latent_shape(sections["latent"], dataset, data_cfg)
        cfg = run_config_for(dataset, data_cfg, sections, preset, latent_shape)
    else:
        cfg = _on_base(base, sections, preset)
    cfg = replace(cfg, schedule=_apply(cfg.schedule, "schedule", sections["schedule"]),
                  train=_apply(cfg.train, "train", sections["train"]))
    return RunConfig.from_dict(cfg.to_dict()), dataset     # re-validate the combination


def split_options(overrides: dict[str, Any]) -> dict[str, dict]:
    """{"train.lr": 1e-3, ...} -> {"train": {"lr": 1e-3}, ...}; an unknown section is an error."""
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"option {key!r} must be section.field with section one of {sorted(sections)}.")
        sections[section][name] = value
    return sections


def _latent_shape(latent: dict, dataset, data_cfg: DataConfig) -> tuple[int, int, int] | None:
    """(channels, size, size) of the autoencoder's latents of the data's images, for a latent run; else None."""
    if not latent:
        return None
    channels, size = dataset.channels, dataset.image_size
    path = LatentConfig(**{"image_size": size, "channels": channels, **latent}).autoencoder
    try:
        return load_autoencoder(path).latent_shape((channels, size, size))
    except ValueError as e:
        raise ConfigError(f"the autoencoder {path} does not fit the data ({channels} channel(s), "
                          f"{size}x{size}): {e} Train one on this data (diffusekit train-autoencoder --data "
                          f"{data_cfg.source}), or convert the images with --channels / --image-size.") from e


def run_config_for(dataset, data_cfg: DataConfig, sections: dict[str, dict], preset: str | None,
                   latent_shape: tuple[int, int, int] | None) -> RunConfig:
    """The RunConfig of a new run on this (opened) data: the model follows the data or the latents."""
    latent, text, size, channels = None, None, dataset.image_size, dataset.channels
    if latent_shape is not None:
        latent = LatentConfig(**{"image_size": size, "channels": channels, **sections["latent"]})
        channels, size, _ = latent_shape
    model_over = dict(sections["model"])
    num_classes = dataset.num_classes if dataset.labels is not None else 0
    if sections["text"]:
        text = _text_config(sections["text"], dataset)
        model_over = {"text_conditioning": "both", "context_dim": _text_dim(text), **model_over}
        num_classes = 0            # the captions condition the model, not class labels
        data_cfg = replace(data_cfg, class_labels=False)
    model = model_config(size, channels, num_classes, preset, _device_type(sections["train"]), **model_over)
    return RunConfig(model=model, data=data_cfg, latent=latent, text=text,
                     class_names=list(dataset.class_names) if num_classes else [])


def _device_type(train: dict) -> str:
    """The type of the device a new run will train on ("cpu", "cuda", "mps"): its layout may depend on it."""
    return resolve_device(train.get("device") or TrainConfig().device).type


def _on_base(base: RunConfig, sections: dict[str, dict], preset: str | None) -> RunConfig:
    """Options applied on top of a saved or given config (the model keeps its shape unless `preset`)."""
    cfg = replace(base, data=_apply(base.data, "data", sections["data"]))
    model = base.model
    if preset:
        model = UNetConfig.preset(preset, image_size=model.image_size, in_channels=model.in_channels,
                                  num_classes=model.num_classes, prediction_type=model.prediction_type)
    return replace(cfg, model=_apply(model, "model", sections["model"]))


def _text_config(options: dict, dataset) -> TextEncoderConfig:
    """The text encoder for the data's captions: a learned one gets its vocab from them."""
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
    return build_text_encoder(cfg).dim


def _apply(cfg: Config, section: str, values: dict) -> Config:
    fields = {f for f in cfg.to_dict()}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown option {section}.{key}; {section} has {sorted(fields)}.")
    return replace(cfg, **values) if values else cfg
