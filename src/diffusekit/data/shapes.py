"""The built-in captioned data set `shapes`: one anti-aliased coloured shape on black, 32x32 RGB.

The spec (tests check it; issue 9):
  - shape: circle | square (axis-aligned) | triangle (upright: flat base at the bottom, apex at
    the top centre, base width = height = the size);
  - colour: red (1,0,0) | green (0,1,0) | blue (0,0,1) | yellow (1,1,0) | magenta (1,0,1) |
    cyan (0,1,1), times a brightness drawn uniformly from [0.75, 1];
  - size: small (bounding-box side 7-10 px) | large (13-16 px), uniform;
  - position: the bounding-box centre at left (9,16), right (23,16), top (16,9), bottom (16,23)
    or center (16,16), as (x, y) in pixels with the image spanning [0, 32], plus a uniform jitter
    of +-1.5 px in each coordinate;
  - caption: "a {size} {colour} {shape} {position}", e.g. "a large red circle on the left".
Image i depends only on (seed, split, i), so the first n images are the same for every n.
Edges are anti-aliased by coverage: each pixel is the mean of a 4x4 grid of point samples.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32
DEFAULT_COUNT = 10_000
SUPERSAMPLE = 4
JITTER = 1.5
BRIGHTNESS = (0.75, 1.0)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
           "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1)}
SIZES = {"small": (7.0, 10.0), "large": (13.0, 16.0)}
POSITIONS = {"left": ((9, 16), "on the left"), "right": ((23, 16), "on the right"),
             "top": ((16, 9), "at the top"), "bottom": ((16, 23), "at the bottom"),
             "center": ((16, 16), "in the center")}
# the categorical attributes of each image, in caption order; values index these tuples
ATTRIBUTES = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS)}
_SPLIT_KEYS = {"train": 0, "test": 1, "t10k": 1}


@dataclass(frozen=True)
class ShapeSpec:
    """One image's attributes and its exact geometry (pixel units, image spanning [0, 32])."""
    size: str
    colour: str
    shape: str
    position: str
    side: float          # bounding-box side
    cx: float            # bounding-box centre
    cy: float
    brightness: float

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][1]}"

    @property
    def attributes(self) -> dict[str, str]:
        return {"size": self.size, "colour": self.colour, "shape": self.shape, "position": self.position}


def draw_spec(index: int, seed: int = 0, split: str = "train") -> ShapeSpec:
    """The attributes and geometry of image `index` of the (seed, split) stream."""
    rng = np.random.default_rng([seed, _SPLIT_KEYS[split], index])
    size, colour, shape, position = (names[rng.integers(len(names))] for names in ATTRIBUTES.values())
    (x, y), _ = POSITIONS[position]
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    return ShapeSpec(size, colour, shape, position, side=float(rng.uniform(*SIZES[size])),
                     cx=x + float(jitter[0]), cy=y + float(jitter[1]),
                     brightness=float(rng.uniform(*BRIGHTNESS)))


def render(specs: list[ShapeSpec]) -> np.ndarray:
    """Images (N, 32, 32, 3) float32 in [0, 1] of the given specs."""
    coverage = np.zeros((len(specs), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for start in range(0, len(specs), 256):  # chunks bound the (n, 128, 128) intermediates
        for kind in SHAPES:
            picked = [i for i in range(start, min(start + 256, len(specs))) if specs[i].shape == kind]
            if picked:
                coverage[picked] = _coverage(kind, [specs[i] for i in picked])
    colour = np.array([COLOURS[s.colour] for s in specs], np.float32).reshape(-1, 3) * \
        np.array([s.brightness for s in specs], np.float32)[:, None]          # (N, 3)
    return coverage[..., None] * colour[:, None, None, :]


def _coverage(shape: str, specs: list[ShapeSpec]) -> np.ndarray:
    """The fraction of each pixel (n, 32, 32) inside the shape, from a 4x4 grid of point samples."""
    # sample points at the centres of a SUPERSAMPLE x SUPERSAMPLE grid inside each pixel
    points = (np.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    col = lambda v: np.array(v, np.float32)[:, None, None]  # noqa: E731  (n,) -> (n, 1, 1)
    cx, cy, half = col([s.cx for s in specs]), col([s.cy for s in specs]), col([s.side / 2 for s in specs])
    dx, dy = points[None, None, :] - cx, points[None, :, None] - cy          # (n, 1, W), (n, H, 1)
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upright triangle: from the apex (cy - half) the half-width grows by 1/2 per pixel down
        below_apex = dy + half
        inside = (below_apex >= 0) & (dy <= half) & (np.abs(dx) <= below_apex / 2)
    n, side = len(specs), IMAGE_SIZE
    return inside.reshape(n, side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(2, 4), dtype=np.float32)


def generate_shapes(n: int = DEFAULT_COUNT, seed: int = 0, split: str = "train", start: int = 0):
    """Images start..start+n-1 of the (seed, split) stream: (n, 3, 32, 32) float32 in [0, 1], captions, attributes.

    attributes maps "size", "colour", "shape", "position" to one value name per image.
    """
    specs = [draw_spec(i, seed, split) for i in range(start, start + n)]
    images = torch.from_numpy(render(specs)).permute(0, 3, 1, 2).contiguous()
    attributes = {name: [getattr(s, name) for s in specs] for name in ATTRIBUTES}
    return images, [s.caption for s in specs], attributes


class FolderNotEmptyError(FileExistsError, ValueError):
    """The output folder holds files already; a ValueError too, so that callers report it as bad input."""


def write_shapes_folder(out_dir: str | Path, n: int = DEFAULT_COUNT, seed: int = 0, split: str = "train",
                        overwrite: bool = False) -> Path:
    """Write the first n shapes as PNGs plus a metadata.jsonl (file_name, text and attribute columns).

    Loading the folder gives the built-in set's images up to uint8 rounding and the same captions.
    metadata.jsonl is written last and atomically: a folder without it was not finished.
    """
    from PIL import Image
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FolderNotEmptyError(f"{out} is not empty; choose a new folder, or pass overwrite=True "
                                  "(--overwrite) to write over it.")
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    lines = []
    for start in range(0, n, 1000):
        images, captions, attributes = generate_shapes(min(1000, n - start), seed, split, start)
        # round(v * 255): what to_pixels does to the same images in [-1, 1]
        pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        for k in range(len(pixels)):
            name = f"{start + k:0{width}d}.png"
            Image.fromarray(pixels[k]).save(out / name)
            row = {"file_name": name, "text": captions[k], **{a: v[k] for a, v in attributes.items()}}
            lines.append(json.dumps(row))
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out / "metadata.jsonl")
    return out
