"""An autoencoder folder: its config.json schema, loading it frozen, and the fingerprint of its weights.

A folder written by train_autoencoder (diffusekit.training.autoencoder) holds
  config.json             AutoencoderRunConfig; autoencoder.scaling_factor is set when training ends
  model.safetensors       EMA weights (what encoding uses); metadata autoencoder_config, scaling_factor
  model_raw.safetensors   raw weights;   trainer_state.pt: optimizer, EMA count, step (exact resume),
                          and the discriminator and its optimizer where autoencoder.adversarial_weight > 0
The latent scaling factor 1 / std(z) (LDM sec. 4.3.2) is measured when training ends and saved in
config.json and in the weights' metadata; intermediate checkpoints carry none, and
load_autoencoder refuses them.

`load_autoencoder(path)` gives a frozen autoencoder from such a folder or a diffusers AutoencoderKL
folder; `autoencoder_fingerprint(path)` names its weights and scale, to key a latent cache.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import safetensors
import torch

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.data import DataConfig
from diffusekit.device import resolve_device
from diffusekit.nn.autoencoder import (AutoencoderConfig, DiffusersAutoencoder, KLAutoencoder,
                                       load_diffusers_autoencoder)
from diffusekit.store.files import CheckpointError, load_state_dict_checked
from diffusekit.store.journal import CONFIG_FILE, EMA_FILE
from diffusekit.store.readers import committed_files, read_checkpoint, read_config_json
from diffusekit.store.train_config import BaseTrainConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model*.safetensors"
# fields that may change on resume: they do not alter the optimisation up to the old end
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.save_every", "train.device", "train.eval_images",
                     "train.eval_batch_size", "train.num_grid_images", "train.scaling_images",
                     "autoencoder.scaling_factor")


@dataclass
class AutoencoderTrainConfig(BaseTrainConfig):
    """Optimisation, EMA, precision, evaluation and logging of an autoencoder. Defaults: shapes on a 2-core CPU.

    With cpu_autoencoder_config on shapes the defaults gave 31 dB held-out PSNR at step 500 and 34 dB
    at step 1000, in about 3 minutes of one CPU thread (issue 9's goal: >= 30 dB).
    """

    batch_size: int = 32
    warmup_steps: int = 50
    save_every: int = 500               # also at the end; each save measures held-out PSNR and writes the grid
    logvar_init: float | None = -8.0    # initial posterior log-variance (see init_posterior_logvar); None = as built
    heldout_fraction: float = 0.1       # kept out of training for PSNR (the IDX t10k split for IDX folders)
    eval_images: int = 1000             # held-out images PSNR is measured on; 0 = all
    eval_batch_size: int = 250
    num_grid_images: int = 16           # held-out images in reconstructions.png
    scaling_images: int = 10000         # training images (a seeded choice) the latent std is taken over; 0 = all

    def validate(self) -> None:
        super().validate()
        for name in ("eval_batch_size", "num_grid_images"):
            check_range(name, getattr(self, name), lo=1)
        for name in ("eval_images", "scaling_images"):
            check_range(name, getattr(self, name), lo=0)
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


def read_autoencoder_config(run_dir: str | Path) -> AutoencoderRunConfig:
    """The AutoencoderRunConfig in run_dir/config.json; errors name the file, and a diffusion run's config."""
    return _parse_config(read_config_json(run_dir), Path(run_dir))


def _parse_config(d, run_dir: Path) -> AutoencoderRunConfig:
    path = run_dir / CONFIG_FILE
    if isinstance(d, dict) and "autoencoder" not in d:
        what = "a diffusion run (it has a model section)" if "model" in d else f"not an autoencoder's (keys {sorted(d)})"
        raise ConfigError(f"{path} is {what}, not an autoencoder folder; give a folder written by "
                          f"train_autoencoder (`diffusekit train-autoencoder --out runs/ae`) or a diffusers "
                          f"AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).")
    try:
        return AutoencoderRunConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


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
    if EMA_FILE in committed_files(path):
        return "diffusekit"
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{path} holds neither {EMA_FILE} (a folder written by train_autoencoder) nor "
                            f"diffusion_pytorch_model.safetensors (a diffusers AutoencoderKL); it holds "
                            f"{present or 'nothing'}. If training was stopped before its first save, resume "
                            f"it; otherwise {_WHAT_TO_GIVE}.")


def _unfinished(path: Path, step: str | None, steps: int) -> CheckpointError:
    return CheckpointError(
        f"{path} is an unfinished autoencoder run (saved at step {step} of {steps}): the latent scaling factor "
        f"is measured when training ends. Finish it with train_autoencoder(..., resume=True) (`diffusekit "
        f"train-autoencoder --out {path} --resume`), with fewer steps if it is good enough already.")


def load_trained_autoencoder(path: str | Path) -> tuple[KLAutoencoder, AutoencoderRunConfig]:
    """(KLAutoencoder with its scaling factor, in eval mode; its run config) from a train_autoencoder folder."""
    path = Path(path)
    saved = read_checkpoint(path, weights=(EMA_FILE,))    # one committed save, even while training
    if saved.config is None:
        raise FileNotFoundError(f"{path / CONFIG_FILE} is missing; it describes the autoencoder. Copy the "
                                f"config.json written beside {EMA_FILE}, or {_WHAT_TO_GIVE}.")
    cfg = _parse_config(saved.config, path)
    state_dict, meta = saved.weights[EMA_FILE]
    if "scaling_factor" not in meta:
        raise _unfinished(path, meta.get("step"), cfg.train.steps)
    if "autoencoder_config" in meta:
        trained = AutoencoderConfig.from_dict(json.loads(meta["autoencoder_config"]))
        diff = cfg.autoencoder.diff(trained)
        if diff:
            lines = "\n  ".join(f"autoencoder.{k}: config.json has {a!r}, the weights were trained with {b!r}"
                                for k, (a, b) in diff.items())
            raise CheckpointError(f"{path / EMA_FILE} does not match {path / CONFIG_FILE}:\n  "
                                       f"{lines}\nRestore config.json from the autoencoder's folder.")
    scale = float(meta["scaling_factor"])
    cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, scaling_factor=scale))
    model = KLAutoencoder(cfg.autoencoder)
    load_state_dict_checked(model, state_dict, str(path / EMA_FILE),
                                 hint=f"Check the autoencoder section of {path / CONFIG_FILE}.")
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
        files = [committed_files(path)[EMA_FILE]]
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
