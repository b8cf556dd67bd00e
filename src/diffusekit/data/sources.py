"""`load_dataset`: every kind of source (folder, IDX, .npy/.npz, parquet / HF folders, digits, shapes)
read into memory as one `ImageDataset`: float32 images (N, C, H, W) in [-1, 1], labels, captions.

What was done on the way is recorded in `ImageDataset.notes`, for the CLI to report.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from diffusekit.data.arrays import load_digits_arrays, load_idx_arrays, load_npy_arrays
from diffusekit.data.config import DataConfig, resolve_kind
from diffusekit.data.dataset import SMALLER_HINT, ImageDataset, load_folder
from diffusekit.data.folder import index_folder
from diffusekit.data.images import background_values, center_crop, color_channels, fit_image, output_channels
from diffusekit.memory import check_images_fit


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the images that `cfg` describes into memory as an ImageDataset."""
    kind = resolve_kind(cfg.source, cfg.kind)
    if kind == "folder":
        return load_folder(index_folder(cfg), cfg)
    if kind == "hf":
        from diffusekit.data.hf import load_hf        # the optional extra: imported when used
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
    check_images_fit(len(x), channels, size or h, 3, f"holding {cfg.source} in memory", SMALLER_HINT)
    # in chunks to bound the memory of the float intermediates
    x = torch.cat([fit_image(chunk.float(), channels, size, cfg.crop, background_values(cfg.alpha_background))
                   for chunk in x.split(4096)])
    if size and x.shape[-2:] != (size, size):  # crop='random' keeps the longer side for later
        uncropped, x = x, center_crop(x, size)
    return x.contiguous(), uncropped, channels, notes
