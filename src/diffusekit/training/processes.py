"""This process's place in a torchrun launch, and the device it trains on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusekit.device import rank_world, resolve_device


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
