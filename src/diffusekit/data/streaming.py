"""Image folders read from disk item by item, for data sets larger than memory.

`StreamingImageFolder` decodes and transforms one image per item, exactly as `load_folder` does
for the whole folder, so that a batch drawn from either is the same tensor. `open_dataset`
chooses between the two by the size the images would take in memory.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import Dataset

from diffusekit.data.config import DataConfig, resolve_kind
from diffusekit.data.dataset import DataInfo, ImageDataset, load_folder
from diffusekit.data.sources import load_dataset
from diffusekit.data.folder import FolderIndex, index_folder, resolve_channels, resolve_size
from diffusekit.data.images import augment_item, background_values, center_crop, fit_image, read_image

# above this many bytes of float32 images, open_dataset streams from disk instead
STREAMING_ABOVE_BYTES = 1 << 30


class StreamingImageFolder(DataInfo, Dataset):
    """An indexed image folder decoded per item: (C, S, S) float32 in [-1, 1] and an int64 label (-1: none).

    Items are (image, label) with the image centre-cropped and not flipped; `item(i, seed)`
    gives the augmented image that a training batch holds, with its caption.
    """

    def __init__(self, index: FolderIndex, cfg: DataConfig):
        self.index, self.cfg = index, cfg
        self._channels, notes = resolve_channels(index.stored_channels, cfg.channels, cfg.alpha_background)
        self._size, more = resolve_size(index, cfg)
        self.labels = torch.tensor(index.labels, dtype=torch.int64) if index.labels is not None else None
        self.class_names, self.captions, self.attributes = index.class_names, index.captions, index.attributes
        self.notes = index.notes + notes + more
        self.source, self.hflip, self.crop = cfg.source, cfg.hflip, cfg.crop
        self.config = replace(cfg, channels=self._channels)

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def channels(self) -> int:
        return self._channels

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> torch.Tensor:
        """Image i decoded, in [-1, 1], with its shorter side resized (left uncropped for crop='random')."""
        path = self.index.files[i]
        try:
            x = read_image(path)
        except Exception as err:  # its header was read when indexing; its pixels were not
            raise RuntimeError(f"cannot decode image {path}: {type(err).__name__}: {err}; fix or remove it "
                               "(the streaming data set cannot skip an image mid-training).") from None
        background = background_values(self.cfg.alpha_background)
        return fit_image(x, self._channels, self._size, self.crop, background) * 2 - 1

    def __getitem__(self, i: int):
        label = self.labels[i] if self.labels is not None else torch.tensor(-1)
        return center_crop(self.load(i), self._size), label

    def item(self, i: int, seed: int | None = None) -> tuple[torch.Tensor, int, str]:
        """(image, label or -1, caption or "") of image i; augmented from `seed` when given."""
        x = self.load(i)
        if seed is not None:
            x = augment_item(x, seed, self._size, self.crop == "random", self.hflip)
        label = int(self.labels[i]) if self.labels is not None else -1
        return x, label, self.captions[i] if self.captions is not None else ""


def open_dataset(cfg: DataConfig, streaming: bool | None = None,
                 max_memory_bytes: int = STREAMING_ABOVE_BYTES) -> ImageDataset | StreamingImageFolder:
    """The data set of `cfg`: in memory, or streamed from disk (image folders only).

    streaming=None streams a folder whose images would take more than max_memory_bytes as
    float32 in memory; True and False force the choice. Other sources are always in memory.
    """
    if resolve_kind(cfg.source, cfg.kind) != "folder":
        dataset = load_dataset(cfg)
        if streaming:
            dataset.notes.append("held in memory: streaming applies to image folders only")
        return dataset
    index = index_folder(cfg)
    channels, _ = resolve_channels(index.stored_channels, cfg.channels, cfg.alpha_background)
    size = cfg.image_size or index.sizes[0][0]
    need = len(index) * channels * size * size * 4
    if streaming is None:
        streaming = need > max_memory_bytes
    dataset = StreamingImageFolder(index, cfg) if streaming else load_folder(index, cfg)
    where = "streamed from disk" if streaming else "held in memory"
    dataset.notes.append(f"{where}: {len(index)} images would take {need / 2**20:.0f} MiB as float32 "
                         f"(streaming above {max_memory_bytes / 2**20:.0f} MiB unless chosen)")
    return dataset
