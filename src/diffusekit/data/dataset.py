"""Data sets held in memory: `ImageDataset`, and `load_dataset` for every kind of source.

Every source ends in the same place: float32 images (N, C, H, W) in [-1, 1], int64 labels (or
None), class names, captions (or None) and per-image attributes (or None). What was done on the
way is recorded in `ImageDataset.notes`, for the CLI to report.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch.utils.data import Dataset

from diffusekit.data.arrays import load_digits_arrays, load_idx_arrays, load_npy_arrays
from diffusekit.data.config import DataConfig, resolve_kind
from diffusekit.data.folder import FolderIndex, index_folder, resolve_channels, resolve_size
from diffusekit.data.images import (background_values, center_crop, color_channels, fit_image, output_channels,
                                    random_hflip, read_image)
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


_SMALLER = "use a smaller image size (--image-size) or fewer images (limit)"


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the images that `cfg` describes into memory as an ImageDataset."""
    kind = resolve_kind(cfg.source, cfg.kind)
    if kind == "folder":
        return load_folder(index_folder(cfg), cfg)
    if kind == "hf":
        from diffusekit.data.hf import load_hf
        return load_hf(cfg)
    _refuse_metadata_options(cfg, kind)
    captions = attributes = None
    if kind == "shapes":
        from diffusekit.data.shapes import DEFAULT_COUNT, generate_shapes
        x, captions, attributes = generate_shapes(cfg.limit or DEFAULT_COUNT, cfg.seed, cfg.split)
        labels, class_names = None, []
        notes = [f"shapes: {len(x)} generated images (seed={cfg.seed}, split={cfg.split!r}) with captions"]
    else:
        loader = {"digits": load_digits_arrays, "idx": load_idx_arrays, "npy": load_npy_arrays}[kind]
        # each reader returns values in [0, 1] as (N, c, h, w) with c in 1..4, labels, class names
        x, labels, class_names, notes = loader(cfg)
        if cfg.limit and len(x) > cfg.limit:
            notes.append(f"kept the first {cfg.limit} of {len(x)} images (limit={cfg.limit})")
            x, labels = x[:cfg.limit], labels[:cfg.limit] if labels is not None else None
    if not cfg.class_labels:
        labels, class_names = None, []
    if cfg.caption_template:  # shapes: its captions as `text` and its attributes as the other columns
        from diffusekit.data.captions import template_over_columns
        captions = template_over_columns(cfg.caption_template, {"text": captions, **attributes},
                                         [f"shapes image {i}" for i in range(len(captions))])
    x, uncropped, channels, more = _standardise(x, cfg)
    return ImageDataset(x * 2 - 1, labels, class_names, hflip=cfg.hflip, source=cfg.source,
                        notes=notes + more, captions=captions, attributes=attributes,
                        uncropped=uncropped * 2 - 1 if uncropped is not None else None, crop=cfg.crop,
                        config=replace(cfg, channels=channels))


def _refuse_metadata_options(cfg: DataConfig, kind: str) -> None:
    """An error, before anything is read, for caption options on a source without metadata columns."""
    asked = [f"{name}={getattr(cfg, name)!r}" for name, default in
             (("caption_column", "text"), ("image_column", "file_name"), ("caption_template", ""))
             if getattr(cfg, name) != default and not (kind == "shapes" and name == "caption_template")]
    if asked:
        raise ValueError(f"{asked[0]} reads metadata columns, but {cfg.source} ({kind}) has none; it applies to "
                         "image folders with metadata.jsonl/metadata.csv and datasets folders (caption_template "
                         "also to shapes).")


def _standardise(x: torch.Tensor, cfg: DataConfig):
    """Bring (N, c, h, w) in [0, 1] to the configured channels and size; say what changed.

    Returns the images, the uncropped images (crop='random' on non-square ones) or None, the
    channels and the notes.
    """
    notes = []
    c, (h, w) = x.shape[1], x.shape[-2:]
    channels = cfg.channels or output_channels([c], cfg.alpha_background)
    if c in (2, 4):
        notes.append(f"composited the alpha channel onto {cfg.alpha_background}")
    if cfg.channels == 0:
        notes.append(f"channels: {channels} ({'RGB' if channels == 3 else 'grayscale'}), as the images are")
    elif color_channels(c) != channels:
        notes.append(f"converted {color_channels(c)} channel(s) to {channels}")
    size, uncropped = cfg.image_size, None
    if size and (h, w) != (size, size):
        notes.append(f"resized {h}x{w} to {size}x{size} (shorter side, bicubic; {cfg.crop} crop)")
    elif not size and h != w:
        raise ValueError(f"{cfg.source} holds {h}x{w} images, which are not square; set "
                         f"image_size (for example {min(h, w)}) to resize and crop them.")
    # the result, its [-1, 1] copy and one chunk's float intermediates: refused before allocating
    check_images_fit(len(x), channels, size or h, 3, f"holding {cfg.source} in memory", _SMALLER)
    # in chunks to bound the memory of the float intermediates
    x = torch.cat([fit_image(chunk.float(), channels, size, cfg.crop, background_values(cfg.alpha_background))
                   for chunk in x.split(4096)])
    if size and x.shape[-2:] != (size, size):  # crop='random' keeps the longer side for later
        uncropped, x = x, center_crop(x, size)
    return x.contiguous(), uncropped, channels, notes


def load_folder(index: FolderIndex, cfg: DataConfig, read=read_image) -> ImageDataset:
    """Decode every image of an indexed folder into memory, as the streaming data set would.

    read(index.files[i]) gives image i as (c, H, W) in [0, 1] (other sources pass their own).
    """
    channels, notes = resolve_channels(index.stored_channels, cfg.channels, cfg.alpha_background)
    size, more = resolve_size(index, cfg)
    background = background_values(cfg.alpha_background)
    check_images_fit(len(index), channels, size, 1, f"holding {cfg.source} in memory",
                     _SMALLER + ", or stream the folder from disk (open_dataset(cfg, streaming=True))")
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
