"""This process's place in a torchrun / accelerate launch, the device it trains on, and the launcher's precision."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from diffusekit.config import ConfigError
from diffusekit.device import rank_world, resolve_device

# `accelerate launch --mixed_precision X` sets ACCELERATE_MIXED_PRECISION=X in every process it starts
ACCELERATE_PRECISIONS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it)."""
    rank: int = 0
    world_size: int = 1
    created: bool = False         # whether we initialised the process group (and must destroy it)

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (the local value without torchrun)."""
        value = value.detach().clone().float()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value.item()

    def close(self):
        if self.created:
            torch.distributed.destroy_process_group()


def setup_processes(device: str = "auto") -> tuple[Dist, torch.device]:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (nccl on CUDA, else gloo)."""
    rank, world, local_rank = rank_world()
    device = resolve_device(device)
    if world <= 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), created), device


def launcher_precision(precision: str, environ: Mapping[str, str] = os.environ) -> str:
    """The run's precision under `accelerate launch`: ACCELERATE_MIXED_PRECISION (no / bf16 / fp16, from its
    --mixed_precision) where the config leaves precision at "auto"; bf16 / fp16 against another chosen precision
    is refused in one line. "no" (also accelerate's default when --mixed_precision is not given) keeps a chosen
    precision. Without the variable the config's precision is kept."""
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if not mixed:
        return precision
    if mixed not in ACCELERATE_PRECISIONS:
        raise ConfigError(f"ACCELERATE_MIXED_PRECISION={mixed} (accelerate launch --mixed_precision) is not one "
                          f"diffusekit trains in; use {' / '.join(ACCELERATE_PRECISIONS)}.")
    wanted = ACCELERATE_PRECISIONS[mixed]
    if precision == "auto" or precision == wanted or mixed == "no":   # "no" is also accelerate's default:
        return wanted if precision == "auto" else precision          # it never overrides a chosen precision
    raise ConfigError(f"accelerate launch --mixed_precision {mixed} (ACCELERATE_MIXED_PRECISION) asks for "
                      f"{wanted} but the config sets train.precision={precision!r}; make them agree, or set "
                      "train.precision to \"auto\" to follow the launcher.")
