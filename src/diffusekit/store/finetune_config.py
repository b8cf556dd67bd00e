"""A fine-tuning run's settings: `FinetuneConfig`, saved as RUN/finetune.json (and as config.json of a LoRA run).

A fine-tune starts from a BASE (a diffusekit run or a local diffusers folder) and trains on an image
folder: `method="lora"` trains a LoRA adapter only (nn/lora.py; the run is an adapter folder, see
store/adapter.py), `method="full"` every weight of the network (the run is a plain run: config.json is
the base's run config, the fine-tune's settings are in finetune.json). DreamBooth (Ruiz et al. 2023):
`instance_prompt` replaces every caption; with `class_prompt` and `num_class_images` > 0 the base draws
that many class images once (cached in RUN/class_images/) and each step's loss is the instance loss plus
`prior_loss_weight` times the class loss (prior preservation, eq. 2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.nn.lora import AdapterConfig
from diffusekit.store.run_config import RESUMABLE_CHANGES, TrainConfig

FINETUNE_FILE = "finetune.json"
CLASS_IMAGES = "class_images"            # RUN/class_images/: images.safetensors + what made them (images.json)


def finetune_train_config(**overrides) -> TrainConfig:
    """The fine-tune's train section: a short run at a small constant learning rate, saving often."""
    defaults = dict(steps=400, batch_size=4, lr=1e-4, lr_schedule="constant", warmup_steps=0, ema_decay=0.999,
                    log_every=10, save_every=100, sample_every=100, num_sample_images=4, caption_dropout=0.0,
                    class_dropout=0.0, checkpoints_total_limit=2)
    return TrainConfig(**{**defaults, **overrides})


@dataclass
class FinetuneConfig(Config):
    """What a fine-tuning run trains, on what, and how."""

    base: str = ""                                  # the base run or diffusers folder (as given)
    method: Literal["lora", "full"] = "lora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)   # method="lora" only
    data: str = ""                                  # the instance image folder
    instance_prompt: str = ""                       # replaces every caption when given
    class_prompt: str = ""                          # prior preservation: what the class images show
    num_class_images: int = 0                       # 0 = no prior preservation
    prior_loss_weight: float = 1.0
    train: TrainConfig = field(default_factory=finetune_train_config)

    def validate(self) -> None:
        if not self.base:
            raise ConfigError("base is empty; give the diffusekit run or diffusers folder to fine-tune.")
        if not self.data:
            raise ConfigError("data is empty; give a folder of the images to fine-tune on.")
        check_range("num_class_images", self.num_class_images, lo=0)
        check_range("prior_loss_weight", self.prior_loss_weight, lo=0)
        if self.num_class_images and not self.class_prompt:
            raise ConfigError(f"num_class_images={self.num_class_images} needs a class_prompt (--class-prompt "
                              "\"an emoji\"): the base draws the class images from it.")
        if self.train.grad_accum != 1:
            raise ConfigError("grad_accum must be 1 for a fine-tune (its batches are small); lower batch_size.")

    @property
    def prior(self) -> bool:
        """Whether each step also trains on class images (prior preservation)."""
        return self.num_class_images > 0


# fields that may change on resume (as for a diffusion run)
FINETUNE_RESUMABLE = RESUMABLE_CHANGES


def read_finetune_config(folder: str | Path) -> FinetuneConfig:
    """The FinetuneConfig saved in a fine-tune run folder (finetune.json)."""
    path = Path(folder) / FINETUNE_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {FINETUNE_FILE}, so it is not a fine-tuning run; give the --out of a "
                          "`diffusekit finetune`.")
    try:
        return FinetuneConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e
