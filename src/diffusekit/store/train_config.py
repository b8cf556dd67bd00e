"""The `train` section every trainer's config.json shares: optimisation, EMA, precision, seeds, logging, saves.

`BaseTrainConfig` holds the fields the training skeleton (diffusekit.training.skeleton) reads; each
trainer extends it with its own fields and its own defaults (TrainConfig, the diffusion run's, in
store/run_config.py, AutoencoderTrainConfig in store/autoencoder.py, ClassifierTrainConfig in
store/classifier.py). A subclass that re-declares a field keeps its place in config.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffusekit.config import Config, check_range
from diffusekit.device import DeviceChoice, Precision


@dataclass
class BaseTrainConfig(Config):
    """What every trainer shares. Each trainer's subclass sets defaults that run on a 2-core CPU."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"   # after the linear warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True             # decay_n = min(ema_decay, (1 + n) / (10 + n)) after n updates
    precision: Precision = "auto"       # auto (bf16 where native, else fp32) / fp32 / bf16 / fp16 (adds a grad scaler)
    seed: int = 0
    device: DeviceChoice = "auto"       # auto: CUDA, then MPS, then CPU
    log_every: int = 50
    save_every: int = 500               # also at the last step

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every"):
            check_range(name, getattr(self, name), lo=1)
        for name in ("warmup_steps", "seed"):
            check_range(name, getattr(self, name), lo=0)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("weight_decay", self.weight_decay, lo=0)
        check_range("grad_clip", self.grad_clip, lo=0)
        check_range("ema_decay", self.ema_decay, lo=0, hi=1, hi_open=True)
