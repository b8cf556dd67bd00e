"""The batches of training: step -> (images, labels, captions), the same in memory or streamed.

Which images make up the global batch of a step is `DataOrder` (a fresh permutation
per epoch from derive_seed(seed, "data", epoch)); each image's random crop and flip are drawn from
its own seed, derive_seed(seed, "augment", step, position in the global batch). A batch is thus a
pure function of (seed, step): a resumed run sees the images an uninterrupted run would, and so
does a run whose data are streamed by DataLoader workers instead of held in memory.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from diffusekit.data.dataset import ImageDataset
from diffusekit.data.images import augment_item
from diffusekit.data.streaming import StreamingImageFolder
from diffusekit.seeding import derive_seed


class DataOrder:
    """Which images make up each step's global batch: a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_images, batch_size, seed
        self.batches_per_epoch = num_images // batch_size      # the last partial batch is dropped
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


class Batch(NamedTuple):
    """One step's images (B, C, H, W) float32 in [-1, 1], int64 labels (B,) or None, captions or None."""
    images: torch.Tensor
    labels: torch.Tensor | None
    captions: list[str] | None


class BatchSource:
    """Batches by training step from an ImageDataset (in memory) or a StreamingImageFolder (DataLoader).

    batch(step) returns this rank's share of the global batch of `step`: items rank * B / world_size
    to (rank + 1) * B / world_size. Calls with consecutive steps stream with prefetching; any other
    step restarts the loader there (what a resume does). close() stops the workers.
    """

    def __init__(self, dataset: ImageDataset | StreamingImageFolder, batch_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, device: str | torch.device = "cpu",
                 pin_memory: bool = False, prefetch_factor: int = 2):
        if len(dataset) < batch_size:
            raise ValueError(f"the data hold {len(dataset)} images, fewer than batch_size={batch_size}; "
                             f"set batch_size to at most {len(dataset)}.")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is the global batch and must split evenly over "
                             f"{world_size} processes; use a multiple of {world_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not one of the {world_size} processes (0..{world_size - 1}).")
        self.dataset, self.seed, self.device = dataset, seed, torch.device(device)
        self.order = DataOrder(len(dataset), batch_size, seed)
        self.per_rank, self.rank = batch_size // world_size, rank
        self.random_crop, self.hflip = dataset.crop == "random", dataset.hflip
        self.streaming = isinstance(dataset, StreamingImageFolder)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._loader, self._next_step = None, None
        if not self.streaming:
            self._images = dataset.images.to(self.device)
            uncropped = dataset.uncropped
            self._sources = self._images if uncropped is None else [x.to(self.device) for x in uncropped]
            self._labels = dataset.labels.to(self.device) if dataset.labels is not None else None

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def items(self, step: int) -> tuple[list[int], list[int] | None]:
        """The dataset indices of this rank's share of the batch of `step`, and their augment seeds (None: none)."""
        first = self.rank * self.per_rank
        indices = self.order.batch(step)[first:first + self.per_rank].tolist()
        if not (self.random_crop or self.hflip):
            return indices, None
        return indices, [derive_seed(self.seed, "augment", step, first + k) for k in range(len(indices))]

    def batch(self, step: int) -> Batch:
        """This rank's share of the global batch of `step`, on the device."""
        return self._streamed(step) if self.streaming else self._in_memory(step)

    def _in_memory(self, step: int) -> Batch:
        indices, seeds = self.items(step)
        idx = torch.tensor(indices, device=self.device)
        if seeds is None:
            images = self._images[idx]
        else:
            size = self.dataset.image_size
            images = torch.stack([augment_item(self._sources[i], s, size, self.random_crop, self.hflip)
                                  for i, s in zip(indices, seeds)])
        labels = self._labels[idx] if self._labels is not None else None
        captions = [self.dataset.captions[i] for i in indices] if self.dataset.captions is not None else None
        return Batch(images, labels, captions)

    def _streamed(self, step: int) -> Batch:
        if self._loader is None or step != self._next_step:
            self.close()
            self._loader = iter(DataLoader(
                _Items(self.dataset), batch_sampler=_StepSampler(self, step), num_workers=self.num_workers,
                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if self.num_workers else None))
        images, labels, captions = next(self._loader)
        self._next_step = step + 1
        images = images.to(self.device, non_blocking=self.pin_memory)
        labels = labels.to(self.device) if self.dataset.labels is not None else None
        return Batch(images, labels, list(captions) if self.dataset.captions is not None else None)

    def close(self) -> None:
        """Stop the DataLoader workers, if any are running."""
        self._loader, self._next_step = None, None

    def __enter__(self) -> BatchSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Items(Dataset):
    """Keys (index, seed) to augmented items of a streaming data set, for the DataLoader."""

    def __init__(self, dataset: StreamingImageFolder):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int | None]):
        return self.dataset.item(*key)


class _StepSampler:
    """The DataLoader's batch sampler: the (index, seed) keys of steps start, start + 1, ..."""

    def __init__(self, source: BatchSource, start: int):
        self.source, self.start = source, start

    def __iter__(self):
        for step in itertools.count(self.start):
            indices, seeds = self.source.items(step)
            yield list(zip(indices, seeds or [None] * len(indices)))
