"""Data sets held in memory: `ImageDataset`, and `load_folder` (an indexed folder decoded into memory).

Every source ends in the same place: float32 images (N, C, H, W) in [-1, 1], int64 labels (or
None), class names, captions (or None) and per-image attributes (or None). What was done on the
way is recorded in `ImageDataset.notes`, for the CLI to report.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch.utils.data import Dataset

from diffusekit.data.config import DataConfig
from diffusekit.data.folder import FolderIndex, resolve_channels, resolve_size
from diffusekit.data.images import background_values, center_crop, fit_image, random_hflip, read_image
from diffusekit.memory import check_images_fit


class DataInfo:
    """What every data set tells about itself, in memory or streamed from disk."""
    labels: torch.Tensor | None           # (N,) int64 class indices, or None
    class_names: list[str]
    captions: list[str] | None            # one caption per image, or None
    attributes: dict[str, list] | None    # per-image values of named attributes (shapes, metadata columns)
    notes: list[str]                      # what loading did, for the CLI to report
    source: str
    config: DataConfig | None             # the config with channels resolved (what to record in a run)
    hflip: bool
    crop: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageDataset(DataInfo, Dataset):
    """Images (N, C, H, W) float32 in [-1, 1] held in memory, with int64 labels or None.

    Items are (image, label) pairs; label is -1 when the data set has no labels, so that the
    default collate works either way. With crop='random', `uncropped` holds the resized images
    before their crop (indexable by item) and `images` their centre crops.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 class_names: list[str] | None = None, hflip: bool = False,
                 source: str = "", notes: list[str] | None = None, *,
                 captions: list[str] | None = None, attributes: dict[str, list] | None = None,
                 uncropped=None, crop: str = "center", config: DataConfig | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        for name, values in (("labels", labels), ("captions", captions), ("uncropped", uncropped),
                             *((f"attribute {k!r}", v) for k, v in (attributes or {}).items())):
            if values is not None and len(values) != len(images):
                raise ValueError(f"{len(images)} images but {len(values)} {name}")
        self.images, self.labels = images, labels
        self.class_names = list(class_names or [])
        self.hflip, self.crop, self.uncropped = hflip, crop, uncropped
        self.source, self.notes, self.config = source, list(notes or []), config
        self.captions, self.attributes = captions, attributes

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        label = self.labels[i] if self.labels is not None else torch.tensor(-1)
        return self.images[i], label

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random horizontal flips of a batch (B, C, H, W) if hflip is set; identity otherwise."""
        return random_hflip(x, generator) if self.hflip else x


SMALLER_HINT = "use a smaller image size (--image-size) or fewer images (limit)"


def load_folder(index: FolderIndex, cfg: DataConfig, read=read_image) -> ImageDataset:
    """Decode every image of an indexed folder into memory, as the streaming data set would.

    read(index.files[i]) gives image i as (c, H, W) in [0, 1] (other sources pass their own).
    """
    channels, notes = resolve_channels(index.stored_channels, cfg.channels, cfg.alpha_background)
    size, more = resolve_size(index, cfg)
    background = background_values(cfg.alpha_background)
    check_images_fit(len(index), channels, size, 1, f"holding {cfg.source} in memory",
                     SMALLER_HINT + ", or stream the folder from disk (open_dataset(cfg, streaming=True))")
    images = torch.empty(len(index), channels, size, size)
    uncropped, keep, skipped = {}, [], []  # uncropped: only the images crop='random' has left wide
    for i, path in enumerate(index.files):
        try:
            x = fit_image(read(path), channels, size, cfg.crop, background) * 2 - 1
        except Exception as err:  # the header was readable, the pixels were not
            if cfg.strict:
                raise ValueError(f"cannot decode image {path}: {type(err).__name__}: {err}; fix or remove "
                                 "it, or set strict=False to skip unreadable images.") from None
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=3)
            skipped.append(path)
            continue
        if x.shape[-2:] != (size, size):
            uncropped[len(keep)] = x
        images[len(keep)] = center_crop(x, size)
        keep.append(i)
    if skipped:
        index = index.subset(keep)
        notes.append(f"skipped {len(skipped)} images whose pixels could not be decoded")
    if not keep:
        raise ValueError(f"none of the {len(skipped)} image files under {index.root} could be decoded.")
    images = images[:len(keep)]
    uncropped = [uncropped.get(k, images[k]) for k in range(len(keep))] if uncropped else None
    labels = torch.tensor(index.labels, dtype=torch.int64) if index.labels is not None else None
    return ImageDataset(images, labels, index.class_names, hflip=cfg.hflip, source=cfg.source,
                        notes=index.notes + notes + more, captions=index.captions,
                        attributes=index.attributes, uncropped=uncropped, crop=cfg.crop,
                        config=replace(cfg, channels=channels))
