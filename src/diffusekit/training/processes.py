"""This process's place in a torchrun / accelerate launch, the device it trains on, and the launcher's precision.

What every trainer does under torchrun lives here, once (training.skeleton calls it): join the process
group (`setup_processes`), split the GLOBAL batch into this rank's rows (`Dist.rows`, `Dist.check_split`),
wrap the network in DistributedDataParallel (`Dist.wrap`: only parameters that require grad are
all-reduced, so a LoRA's frozen base is never sent), agree on the step to resume (`Dist.same_step`),
and hand rank 0's tensors to the other ranks (`Dist.broadcast`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from diffusekit.config import ConfigError
from diffusekit.device import rank_world, resolve_device
from diffusekit.store import CheckpointError

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

    def check_split(self, batch_size: int, grad_accum: int = 1) -> None:
        """Refuse a global batch that does not split evenly over the ranks and their micro-batches."""
        if batch_size % (self.world_size * grad_accum):
            raise ConfigError(f"batch_size={batch_size} is the global batch and must split evenly over "
                              f"{self.world_size} process(es) x grad_accum={grad_accum} micro-batches; use a "
                              f"multiple of {self.world_size * grad_accum}.")

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of batch_size: rank * b to (rank + 1) * b, b = batch_size / world."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """model in DistributedDataParallel under torchrun (model itself in one process).

        DDP all-reduces the gradients of the parameters that require grad (a LoRA's adapter; a frozen base
        is left out) and, at construction, copies rank 0's weights to every rank. find_unused_parameters
        stays off: every trainable parameter of every trainer's forward gets a gradient each step (the
        fine-tune's text-encoder LoRA included; tests/training/test_finetune_torchrun.py)."""
        if self.world_size == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def same_step(self, run_dir, step: int | None) -> None:
        """Refuse to go on unless every rank resumes from the same step (None: no checkpoint): a run folder that
        only some nodes see would mix steps silently."""
        if self.world_size == 1:
            return
        steps = [None] * self.world_size
        torch.distributed.all_gather_object(steps, step)
        if len(set(steps)) > 1:
            seen = ", ".join(f"rank {r}: {'no checkpoint' if s is None else f'step {s}'}" for r, s in enumerate(steps))
            raise CheckpointError(f"the processes see different checkpoints in {run_dir} ({seen}); every node "
                                  f"must read the same run directory: put --out on a file system all nodes "
                                  f"share, or copy the run to the same path on every node before resuming.")

    def broadcast(self, value: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Rank 0's tensor on every rank (value: rank 0's; the others pass None), returned on the CPU."""
        if self.world_size == 1:
            return value
        meta = [None if value is None else (tuple(value.shape), value.dtype)]
        torch.distributed.broadcast_object_list(meta, src=0)
        shape, dtype = meta[0]
        # contiguous: the collective sends the storage as it lies (a channels-last tensor would arrive transposed)
        buffer = value.to(device).contiguous() if self.rank == 0 else torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.broadcast(buffer, src=0)
        return buffer.cpu()


def setup_processes(device: str = "auto") -> tuple[Dist, torch.device]:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (nccl on CUDA, else gloo)."""
    rank, world, local_rank = rank_world()
    device = resolve_device(device)
    if world <= 1:
        return Dist(), device
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"torchrun trains on CUDA GPUs (nccl) or CPUs (gloo); {device.type} has no process-group "
                          f"backend, so run one process there (without torchrun), or give --device cpu.")
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
