"""The held-out images a trainer measures on: the IDX t10k split, else a seeded random share."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from diffusekit.config import ConfigError
from diffusekit.data.config import DataConfig, resolve_kind
from diffusekit.data.dataset import ImageDataset
from diffusekit.data.sources import load_dataset
from diffusekit.seeding import derive_seed


def split_heldout(data_cfg: DataConfig, dataset: ImageDataset, fraction: float,
                  seed: int) -> tuple[ImageDataset, ImageDataset, str]:
    """(train, held-out, description): the IDX t10k split for an IDX folder, else a seeded random share."""
    if data_cfg.split == "train" and resolve_kind(data_cfg.source, data_cfg.kind) == "idx" \
            and Path(data_cfg.source).is_dir():
        test = load_dataset(dataclasses.replace(data_cfg, split="t10k", limit=0))
        return dataset, test, f"{data_cfg.source} split t10k ({len(test)} images)"
    n = len(dataset)
    n_held = max(1, round(n * fraction))
    if n - n_held < 1:
        raise ConfigError(f"the data holds {n} images, too few to hold out {fraction:.0%} for testing; "
                          f"use more images.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "heldout")))
    held, kept = perm[:n_held].sort().values, perm[n_held:].sort().values

    def subset(idx):
        return ImageDataset(dataset.images[idx], dataset.labels[idx], dataset.class_names,
                            source=dataset.source)
    return subset(kept), subset(held), f"seeded random {fraction:.0%} of {data_cfg.source} ({n_held} images)"
