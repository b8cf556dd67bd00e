"""One image: reading and writing files, pixels <-> tensors, and the transforms every source shares.

The transforms are the configured ones and nothing else:
  - channels: grayscale is repeated to RGB; RGB becomes grayscale by ITU-R 601-2 luma
    (L = 0.299 R + 0.587 G + 0.114 B, as Pillow's convert("L")); an alpha channel (RGBA, LA, and
    a PNG tRNS transparency in P, L and RGB images) is composited onto a background colour
    (black by default, so transparent areas read as background like MNIST; see parse_background);
  - size: the shorter side is resized to `size` (bicubic, antialiased), then the longer side is
    cropped to a square, at the centre or at a random offset drawn from a torch.Generator;
  - flips: a random horizontal flip drawn from a torch.Generator;
  - values: uint8 0-255 (or 16-bit 0-65535) and float [0, 1] are mapped linearly to [-1, 1].
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusekit.config import ConfigError, check_choice

# ITU-R 601-2 luma, the weights Pillow uses for convert("L")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
BACKGROUND_FORMS = '"black", "white" or "R,G,B" with each of R, G, B an integer 0-255, e.g. "255,255,255"'


def parse_background(value: str) -> tuple[int, int, int]:
    """The (R, G, B) colour, 0-255, that a background setting names: "black", "white" or "R,G,B"."""
    if isinstance(value, str) and value.strip().lower() in BACKGROUNDS:
        return BACKGROUNDS[value.strip().lower()]
    parts = value.split(",") if isinstance(value, str) else []
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)
    raise ValueError(f"background {value!r} is not a colour; give {BACKGROUND_FORMS}.")


def background_values(value: str) -> tuple[float, float, float]:
    """A background setting as (R, G, B) in [0, 1], the values images are composited in."""
    return tuple(v / 255 for v in parse_background(value))


# ---------------------------------------------------------------------------------------------
# pixels <-> tensors


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (..., C, H, W), to uint8 pixels (..., H, W, C)."""
    x = x.detach().to("cpu", torch.float32)
    # round((x + 1) / 2 * 255), clamped: the inverse of from_pixels up to rounding
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_pixels(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (..., H, W, C) or (H, W) to float32 images in [-1, 1], (..., C, H, W)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"from_pixels expects uint8 pixels, got dtype {pixels.dtype}; "
                         "convert floats in [0, 1] with (x * 255).round().astype(np.uint8).")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    x = torch.from_numpy(pixels.astype(np.float32)).movedim(-1, -3)
    return x / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# files


class ImageFileError(ValueError):
    """A file that Pillow cannot decode as an image (empty, truncated, not an image); names the file."""


@contextmanager
def open_image(path: str | Path):
    """Image.open(path) as a context manager; a file that does not decode raises ImageFileError naming it.

    Errors of the operating system (missing file, no permission) pass through unchanged: they
    already carry the path. Decoding problems (Pillow raises OSError, SyntaxError, ValueError or
    EOFError for them, with messages such as "Truncated File Read" that do not name the file) become
    one ImageFileError that says which file, what is wrong with it and what to give instead.
    """
    from PIL import Image
    try:
        with Image.open(path) as img:
            yield img
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise ImageFileError(f"{path} cannot be read as an image ({_image_problem(path, e)}); give a PNG, JPEG "
                             f"or other image file that Pillow opens, or write the file again.") from None


def _image_problem(path: str | Path, e: BaseException) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        return "the file is empty: 0 bytes"
    text = str(e).replace(str(path), "").replace("''", "").strip(" :") or type(e).__name__
    return f"{text}; {size} bytes" if size is not None else text


def read_image_array(path: str | Path) -> np.ndarray:
    """Read an image file as float32 (H, W, c) in [0, 1]; c = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)."""
    with open_image(path) as img:
        img.load()
        return pil_to_array(img)


def pil_to_array(img) -> np.ndarray:
    """A PIL image as float32 (H, W, c) in [0, 1]; c = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)."""
    mode = img.mode
    if mode.startswith("I;16"):  # 16-bit grayscale PNG
        return (np.asarray(img, dtype=np.float32) / 65535.0)[:, :, None]
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:
        # a PNG tRNS chunk: one grey level or RGB colour is transparent, which Pillow's convert applies
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        gray = "L" if mode in ("1", "I", "F") else "RGB"
        img = img.convert("RGBA" if "A" in mode else gray)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[:, :, None] if arr.ndim == 2 else arr


def probe_image(path: str | Path) -> tuple[int, int, int]:
    """(c, height, width) of an image file from its header alone; c as read_image_array returns it."""
    with open_image(path) as img:
        return pil_channels(img), img.size[1], img.size[0]


def pil_channels(img) -> int:
    """The channels pil_to_array gives a PIL image: 1, 2 (LA), 3 or 4 (RGBA); read from its mode."""
    mode = img.mode
    if mode == "L" and "transparency" in img.info or mode == "LA":
        return 2
    if mode.startswith("I;16") or mode in ("L", "1", "I", "F"):
        return 1
    if mode in ("P", "RGB"):
        return 4 if "transparency" in img.info else 3
    return 4 if "A" in mode else 3  # RGB, RGBA, PA, CMYK, YCbCr, ...: converted to RGB(A)


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as float32 (c, H, W) in [0, 1], channels as stored (see read_image_array)."""
    return torch.from_numpy(read_image_array(path)).movedim(-1, 0)


def color_channels(c: int) -> int:
    """Colour channels of a stored channel count: an alpha channel (c = 2 or 4) is not colour."""
    return c - 1 if c in (2, 4) else c


def output_channels(stored: list[int], background: str = "black") -> int:
    """The channels images of these stored channel counts read as together: 3 if any is colour, else 1.

    A background that is not grey makes transparent grey images colour, as they then look.
    """
    r, g, b = parse_background(background)
    coloured_background = not r == g == b and any(c in (2, 4) for c in stored)
    return 3 if coloured_background or any(color_channels(c) == 3 for c in stored) else 1


# ---------------------------------------------------------------------------------------------
# transforms of images in [0, 1]


def to_channels(x: torch.Tensor, channels: int, background=0.0) -> torch.Tensor:
    """Convert (..., c, H, W) values in [0, 1] with c in {1, 2, 3, 4} (alpha last) to `channels`.

    An alpha channel is composited onto `background`: a grey level, or (R, G, B), in [0, 1].
    """
    c = x.shape[-3]
    alpha = None
    if c in (2, 4):
        x, alpha = x[..., :-1, :, :], x[..., -1:, :, :]
        c -= 1
    if c != channels:
        x = _convert_colour(x, channels)
    if alpha is None:
        return x
    # out = a * colour + (1 - a) * background   (the "over" operator onto an opaque background)
    return alpha * x + (1 - alpha) * _background(background, channels, x.dtype)


def _convert_colour(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey (..., 1, H, W) repeated to RGB, or RGB (..., 3, H, W) to grey by luma."""
    if channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype).view(3, 1, 1)
    return (x * weights).sum(dim=-3, keepdim=True)


def _background(background, channels: int, dtype) -> torch.Tensor:
    """The background as a (channels, 1, 1) tensor; a colour's luma for grey images (a grey stays exact)."""
    rgb = (background,) * 3 if isinstance(background, (int, float)) else tuple(background)
    if channels == 3:
        return torch.tensor(rgb, dtype=dtype).view(3, 1, 1)
    grey = rgb[0] if rgb[0] == rgb[1] == rgb[2] else sum(w * v for w, v in zip(LUMA_WEIGHTS, rgb))
    return torch.tensor([grey], dtype=dtype).view(1, 1, 1)


def resize_shorter_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) or (C, H, W) in [0, 1] so that the shorter side is `size`."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) == (h, w):
        return x
    batch = x if x.ndim == 4 else x[None]
    # antialias matters when shrinking; bicubic overshoots, hence the clamp
    out = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", align_corners=False,
                        antialias=True).clamp(0, 1)
    return out if x.ndim == 4 else out[0]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centred size x size window of (..., H, W)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One size x size window of (..., H, W) at an offset drawn uniformly from `generator`."""
    h, w = x.shape[-2:]
    top = int(torch.randint(h - size + 1, (1,), generator=generator))
    left = int(torch.randint(w - size + 1, (1,), generator=generator))
    return x[..., top:top + size, left:left + size]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a batch (B, C, H, W) left-right with probability 1/2, drawn from `generator`."""
    device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) in [0, 1] so the shorter side is `size`, then centre-crop to a square."""
    if size == 0 or x.shape[-2:] == (size, size):
        return x
    return center_crop(resize_shorter_side(x, size), size)


# ---------------------------------------------------------------------------------------------
# single images (for the edit commands)


def load_image(path: str | Path, image_size: int = 0, channels: int = 3,
               alpha_background: str = "black") -> torch.Tensor:
    """Read one image file as (1, C, H, W) in [-1, 1], warning about each conversion it makes.

    image_size=0 keeps the native size (the image must then be square); channels=0 keeps the
    image's own colour (1 for grayscale, 3 for colour).
    """
    check_choice("channels", channels, (0, 1, 3))
    background = background_values(alpha_background)
    x = read_image(path)[None]  # (1, c, h, w)
    c, (h, w) = x.shape[1], x.shape[-2:]
    channels = channels or output_channels([c], alpha_background)
    if c in (2, 4):
        warnings.warn(f"{path}: composited its alpha channel onto {alpha_background}", stacklevel=2)
    if color_channels(c) != channels:
        warnings.warn(f"{path}: converted {color_channels(c)} channel(s) to {channels}", stacklevel=2)
    x = to_channels(x, channels, background)
    if image_size and (h, w) != (image_size, image_size):
        warnings.warn(f"{path}: resized {h}x{w} to {image_size}x{image_size} (shorter side to "
                      f"{image_size}, bicubic, then centre crop)", stacklevel=2)
        x = resize_center_crop(x, image_size)
    elif not image_size and h != w:
        raise ValueError(f"{path} is {h}x{w}, not square; pass image_size to resize and crop it.")
    return x * 2 - 1



def load_mask(path: str | Path, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """A mask image as a (1, 1, H, W) tensor of 0/1: white (> threshold) = fill, black = keep; its
    (H, W) must be size."""
    m = torch.from_numpy(read_image_array(path)).float()
    m = m.mean(-1) if m.ndim == 3 else m                       # (H, W[, C]) -> (H, W) in [0, 1]
    if tuple(m.shape) != tuple(size):
        raise ConfigError(f"the mask {path} is {m.shape[1]}x{m.shape[0]} but the model works at "
                          f"{size[1]}x{size[0]}; draw the mask at that size.")
    return (m > threshold).float()[None, None]

def save_image(x: torch.Tensor, path: str | Path) -> Path:
    """Write one image (C, H, W) or (1, C, H, W) in [-1, 1] to path (format from the suffix)."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"save_image writes one image but got a batch of {x.shape[0]}; "
                             "use diffusekit.viz.save_grid for several.")
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects (C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    return write_pixels(to_pixels(x), path)


def write_pixels(pixels: np.ndarray, path: str | Path) -> Path:
    """Write uint8 pixels (H, W, 1 or 3) as an image file (format from the suffix), creating its folder.

    Written through a temporary file and os.replace, so a failed write (a full disk) leaves no
    half image and any previous file intact; the OSError names the file (Pillow's carries no name).
    """
    from PIL import Image
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: {path.suffix or 'no extension'} is not an image file extension Pillow "
                         f"writes; use .png (or .jpg, .webp).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels).save(tmp, format=fmt)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    return path


def fit_image(x: torch.Tensor, channels: int, size: int, crop: str = "center",
              background=0.0) -> torch.Tensor:
    """Bring (..., c, H, W) in [0, 1] to `channels` and, when size > 0, its shorter side to `size`.

    crop='center' then crops the centre square; crop='random' leaves the longer side for a
    random crop when batches are drawn (see `augment_item`).
    """
    x = to_channels(x, channels, background)
    if size and x.shape[-2:] != (size, size):
        x = resize_shorter_side(x, size)
        if crop == "center":
            x = center_crop(x, size)
    return x


def augment_item(x: torch.Tensor, seed: int, size: int, crop: bool, hflip: bool) -> torch.Tensor:
    """One image (C, H, W) randomly cropped to size x size and/or flipped, all drawn from its own seed.

    A seed per item (not per batch) is what makes a batch the same whether it was assembled in
    memory or by DataLoader workers that each see only some of its items.
    """
    g = torch.Generator().manual_seed(seed)
    if crop:
        x = random_crop(x, size, g)
    if hflip:
        x = random_hflip(x[None], g)[0]
    return x
