"""Loading a trained diffusion run: its config and model, checked against the weights' metadata.

`load_run` reads one committed save (store.readers: consistent even while a trainer writes the
next one), checks the weights' metadata against config.json (model shape, prediction type,
schedule) before building anything, and returns the model in eval mode. A reader never writes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from diffusekit.config import ConfigError
from diffusekit.nn.network import build_model
from diffusekit.nn.unet import UNetConfig
from diffusekit.schedule import ScheduleConfig
from diffusekit.store.files import CheckpointError, load_state_dict_checked
from diffusekit.store.journal import CONFIG_FILE, EMA_FILE, RAW_FILE
from diffusekit.store.readers import read_checkpoint
from diffusekit.store.run_config import RunConfig, read_run_config


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
        raise CheckpointError(f"{path} does not match {config_path}:\n  {lines}\n"
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
    name = EMA_FILE if weights == "ema" else RAW_FILE
    # one committed save, read consistently even while a trainer writes the next one
    saved = read_checkpoint(run_dir, weights=(name,))
    path = run_dir / name
    if saved.config is None:
        read_run_config(run_dir)            # raises the missing-file error with its hint
    try:
        cfg = RunConfig.from_dict(saved.config)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: {e}") from e
    state_dict, meta = saved.weights[name]
    check_weights_metadata(cfg, meta, path, run_dir / CONFIG_FILE)
    model = build_model(cfg)
    load_state_dict_checked(model, state_dict, str(path),
                                 hint=f"Check the model section of {run_dir / CONFIG_FILE}.")
    extra = {"step": int(meta["step"]) if "step" in meta else None, "class_names": list(cfg.class_names),
             "weights_path": path, "metadata": meta}
    return cfg, model.to(device).eval(), extra
