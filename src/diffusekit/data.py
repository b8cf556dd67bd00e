"""Image datasets as tensors in [-1, 1]: image folders, MNIST IDX files, .npy/.npz arrays, `digits`.

Every source ends in the same place: an `ImageDataset` holding float32 images of shape
(N, C, H, W) in [-1, 1], int64 labels (or None) and the class names. The transforms are the
configured ones and nothing else:
  - channels: grayscale is repeated to RGB; RGB becomes grayscale by ITU-R 601-2 luma
    (L = 0.299 R + 0.587 G + 0.114 B, as Pillow's convert("L")); an alpha channel is composited
    onto `alpha_background` (black by default, so transparent areas read as background like MNIST);
  - size: the shorter side is resized to `image_size` (bicubic, antialiased) and the longer side
    centre-cropped; image_size=0 keeps the source's native size;
  - values: uint8 0-255 (or 16-bit 0-65535) and float [0, 1] are mapped linearly to [-1, 1].
What was done is recorded in `ImageDataset.notes`, for the CLI to report.
"""
from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusekit.config import Config, ConfigError, check_choice, check_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
ARRAY_EXTENSIONS = (".npy", ".npz")
# ITU-R 601-2 luma, the weights Pillow uses for convert("L")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class DataConfig(Config):
    """Where the training images come from and how they are brought to one shape."""
    source: str = "digits"  # "digits", an image folder, an IDX file or folder, or a .npy/.npz file
    kind: Literal["auto", "digits", "folder", "idx", "npy"] = "auto"  # auto: decided from source
    image_size: int = 0  # side of the square output images; 0 = the source's native size
    channels: int = 1  # 1 (grayscale) or 3 (RGB); sources are converted to this
    class_labels: bool = True  # keep labels: digits/IDX/npz labels, or sub-folder names
    split: Literal["train", "t10k"] = "train"  # IDX split when source is a folder of IDX files
    limit: int = 0  # keep at most this many images (the first ones, in file order); 0 = all
    hflip: bool = False  # random horizontal flips in augment(); never for digits
    alpha_background: Literal["black", "white"] = "black"  # what transparent pixels become

    def validate(self) -> None:
        check_choice("channels", self.channels, (1, 3))
        check_range("image_size", self.image_size, lo=0)
        check_range("limit", self.limit, lo=0)
        if self.hflip and (self.kind == "digits" or self.source == "digits"):
            raise ConfigError("hflip=True with the digits source would train on mirrored digits; "
                              "set hflip=False (flips suit photos, not glyphs).")


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


def _to_channels(x: torch.Tensor, channels: int, background: float) -> torch.Tensor:
    """Convert (N, c, H, W) values in [0, 1] with c in {1, 2, 3, 4} (alpha last) to `channels`."""
    c = x.shape[1]
    if c in (2, 4):  # composite onto the background: out = a * colour + (1 - a) * background
        alpha = x[:, -1:]
        x = alpha * x[:, :-1] + (1 - alpha) * background
        c -= 1
    if c == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) in [0, 1] so the shorter side is `size`, then centre-crop to a square."""
    h, w = x.shape[-2:]
    if size == 0 or (h == size and w == size):
        return x
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        # antialias matters when shrinking; bicubic overshoots, hence the clamp
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------------
# the dataset


class ImageDataset(Dataset):
    """Images (N, C, H, W) float32 in [-1, 1] held in memory, with int64 labels or None.

    Items are (image, label) pairs; label is -1 when the dataset has no labels, so that the
    default collate works either way.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 class_names: list[str] | None = None, hflip: bool = False,
                 source: str = "", notes: list[str] | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.class_names = list(class_names or [])
        self.hflip = hflip
        self.source = source
        self.notes = list(notes or [])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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
        """Apply the configured augmentations to a batch (B, C, H, W); identity if none are set."""
        if not self.hflip:
            return x
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the images that `cfg` describes into memory as an ImageDataset."""
    kind = _resolve_kind(cfg.source, cfg.kind)
    loaders = {"digits": _load_digits, "folder": _load_folder, "idx": _load_idx, "npy": _load_array}
    # each loader returns values in [0, 1] as (N, c, h, w) with c in 1..4, labels, class names
    x, labels, class_names, notes = loaders[kind](cfg)
    if not cfg.class_labels:
        labels, class_names = None, []
    if cfg.limit and len(x) > cfg.limit:
        notes.append(f"kept the first {cfg.limit} of {len(x)} images (limit={cfg.limit})")
        x = x[:cfg.limit]
        labels = labels[:cfg.limit] if labels is not None else None
    x, more = _standardise(x, cfg)
    return ImageDataset(x * 2 - 1, labels, class_names, hflip=cfg.hflip, source=cfg.source,
                        notes=notes + more)


def _standardise(x: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, list[str]]:
    """Bring (N, c, h, w) in [0, 1] to the configured channels and size; say what changed."""
    notes = []
    c, (h, w) = x.shape[1], x.shape[-2:]
    background = 1.0 if cfg.alpha_background == "white" else 0.0
    if c in (2, 4):
        notes.append(f"composited the alpha channel onto {cfg.alpha_background}")
    if c - (c in (2, 4)) != cfg.channels:
        notes.append(f"converted {c - (c in (2, 4))} channel(s) to {cfg.channels}")
    x = _to_channels(x.float(), cfg.channels, background)
    if cfg.image_size and (h, w) != (cfg.image_size, cfg.image_size):
        notes.append(f"resized {h}x{w} to {cfg.image_size}x{cfg.image_size} "
                     "(shorter side, bicubic; centre crop)")
        # in chunks to bound the memory of the float intermediate
        x = torch.cat([_resize_center_crop(chunk, cfg.image_size) for chunk in x.split(4096)])
    elif h != w:
        raise ValueError(f"{cfg.source} holds {h}x{w} images, which are not square; set "
                         f"image_size (for example {min(h, w)}) to resize and centre-crop them.")
    return x.contiguous(), notes


def _resolve_kind(source: str, kind: str) -> str:
    if kind != "auto":
        return kind
    if source == "digits":
        return "digits"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist; give 'digits', an image "
                                f"folder ({', '.join(IMAGE_EXTENSIONS)}), an IDX file or folder, "
                                f"or a .npy/.npz file.")
    if path.is_dir():
        return "idx" if _idx_files_in(path) else "folder"
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        return "npy"
    if "idx" in path.name or "ubyte" in path.name:
        return "idx"
    raise ValueError(f"cannot tell what kind of data {source!r} is; expected a folder, an IDX "
                     f"file (name containing 'idx' or 'ubyte'), or .npy/.npz; set kind explicitly.")


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)


def _load_digits(cfg: DataConfig):
    from sklearn.datasets import load_digits
    digits = load_digits()
    # 8x8 values are counts 0..16 of set pixels in 4x4 blocks (UCI optdigits): scale to [0, 1]
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    notes = ["digits: scikit-learn load_digits, 0-16 -> [0, 1]"]
    return x, labels, [str(i) for i in range(10)], notes


# ---------------------------------------------------------------------------------------------
# image folders


def _load_folder(cfg: DataConfig):
    root = Path(cfg.source)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder.")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}, any case) found "
                                f"under {root} (searched sub-folders too).")
    class_of = _folder_classes(root, files) if cfg.class_labels else None
    class_names = sorted(set(class_of.values())) if class_of else []
    size = cfg.image_size
    images, labels, skipped = [], [], []
    converted = composited = resized = 0
    for path in files:
        if cfg.limit and len(images) >= cfg.limit:
            break
        try:
            x = torch.from_numpy(read_image_array(path)).movedim(-1, 0)[None]  # (1, c, h, w)
        except Exception as err:  # a corrupt file must not stop the whole dataset
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}",
                          stacklevel=2)
            skipped.append(path)
            continue
        converted += x.shape[1] - (x.shape[1] in (2, 4)) != cfg.channels
        composited += x.shape[1] in (2, 4)
        x = _to_channels(x, cfg.channels, 1.0 if cfg.alpha_background == "white" else 0.0)
        if size == 0 and images and x.shape[-2:] != images[0].shape[-2:]:
            raise ValueError(f"{path} is {x.shape[-2]}x{x.shape[-1]} but {files[0]} is "
                             f"{images[0].shape[-2]}x{images[0].shape[-1]}; set image_size to "
                             "resize all images to one square size.")
        resized += bool(size) and tuple(x.shape[-2:]) != (size, size)
        images.append(_resize_center_crop(x, size) if size else x)
        if class_of:
            labels.append(class_names.index(class_of[path]))
    if skipped:
        names = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} of {len(images) + len(skipped)} files: {names}",
                      stacklevel=2)
    if not images:
        raise ValueError(f"none of the {len(files)} image files under {root} could be read.")
    notes = [f"read {len(images)} images from {root}"]
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable files")
    if composited:
        notes.append(f"composited the alpha channel of {composited} images onto "
                     f"{cfg.alpha_background}")
    if converted:
        notes.append(f"converted {converted} images to {cfg.channels} channel(s)")
    if resized:
        notes.append(f"resized {resized} images to {size}x{size} (shorter side, bicubic; "
                     "centre crop)")
    label_tensor = torch.tensor(labels, dtype=torch.int64) if class_of else None
    return torch.cat(images), label_tensor, class_names, notes


def _folder_classes(root: Path, files: list[Path]) -> dict[Path, str] | None:
    """Map each file to its top-level sub-folder name; None when all images sit in root itself."""
    top = {p: p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    if not top:
        return None
    loose = [p for p in files if p not in top]
    if loose:
        raise ValueError(f"{len(loose)} images sit directly in {root} (e.g. {loose[0].name}) while "
                         "others are in class sub-folders; move them into a sub-folder, or set "
                         "class_labels=False to ignore the sub-folder names.")
    return top


def read_image_array(path: str | Path) -> np.ndarray:
    """Read an image file as float32 (H, W, c) in [0, 1]; c = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)."""
    from PIL import Image
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode.startswith("I;16"):  # 16-bit grayscale PNG
            return (np.asarray(img, dtype=np.float32) / 65535.0)[:, :, None]
        if mode in ("P", "PA"):
            img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            gray = "L" if mode in ("1", "I", "F") else "RGB"
            img = img.convert("RGBA" if "A" in mode else gray)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[:, :, None] if arr.ndim == 2 else arr


# ---------------------------------------------------------------------------------------------
# IDX (MNIST format)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a numpy array of its stored shape."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        with gzip.open(path, "rb") as f:
            data = f.read()
    else:
        data = path.read_bytes()
    # magic: two zero bytes, a type code, the number of dimensions; then one int32 size per dim
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {data[:4].hex()}; "
                         "expected 0000 08 03 for images or 0000 08 01 for labels).")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes but its header {shape} says {expected}; "
                         "the file is truncated or corrupt.")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_files_in(folder: Path, split: str | None = None) -> list[Path]:
    pattern = f"{split}-images*idx3*" if split else "*idx3*"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def _find_idx_pair(cfg: DataConfig) -> tuple[Path, Path | None]:
    """The images file and its labels file (None if absent) for an IDX source."""
    path = Path(cfg.source)
    if path.is_dir():
        found = _idx_files_in(path, cfg.split)
        if not found:
            raise FileNotFoundError(f"no {cfg.split}-images IDX file in {path} (looked for "
                                    f"{cfg.split}-images*idx3* such as {cfg.split}-images-idx3-"
                                    "ubyte.gz); check the folder and split ('train' or 't10k').")
        images = found[0]
    elif path.is_file():
        images = path
    else:
        raise FileNotFoundError(f"IDX source {path} does not exist.")
    # train-images-idx3-ubyte(.gz) -> train-labels-idx1-ubyte, with or without .gz
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    base = name[:-3] if name.endswith(".gz") else name
    candidates = [images.with_name(base), images.with_name(base + ".gz")]
    labels = next((c for c in candidates if c.is_file() and c != images), None)
    return images, labels


def _load_idx(cfg: DataConfig):
    images_path, labels_path = _find_idx_pair(cfg)
    arr = read_idx(images_path)
    if arr.ndim != 3:
        raise ValueError(f"{images_path} holds an array of shape {arr.shape}; expected images "
                         "(N, rows, cols).")
    x = _array_to_unit(arr, str(images_path)).unsqueeze(1)
    labels, class_names = None, []
    if cfg.class_labels:
        if labels_path is None:
            warnings.warn(f"no labels file beside {images_path}; loading without labels",
                          stacklevel=3)
        else:
            labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
            if len(labels) != len(x):
                raise ValueError(f"{labels_path} has {len(labels)} labels for the "
                                 f"{len(x)} images in {images_path}.")
            class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return x, labels, class_names, [f"read {len(x)} images from {images_path}"]


# ---------------------------------------------------------------------------------------------
# numpy arrays


def _load_array(cfg: DataConfig):
    path = Path(cfg.source)
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} does not exist.")
    labels = None
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            image_key = next((k for k in ("images", "x", "X", "arr_0") if k in keys), None)
            if image_key is None:
                image_key = keys[0] if len(keys) == 1 else None
            if image_key is None:
                raise ValueError(f"{path} has arrays {keys}; store the images under 'images' "
                                 "(and labels under 'labels').")
            arr = z[image_key]
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            if label_key is not None:
                labels = torch.from_numpy(np.asarray(z[label_key]).astype(np.int64).reshape(-1))
    else:
        arr = np.load(path, allow_pickle=False)
    x = _array_to_unit(arr, str(path))
    x = _to_nchw(x, str(path))
    class_names = []
    if labels is not None:
        if len(labels) != len(x):
            raise ValueError(f"{path} has {len(labels)} labels for {len(x)} images.")
        if labels.min() < 0:
            raise ValueError(f"{path} has negative labels (min {int(labels.min())}); "
                             "labels must be class indices 0..K-1.")
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return x, labels, class_names, [f"read {len(x)} images {tuple(x.shape[1:])} from {path}"]


def _array_to_unit(arr: np.ndarray, where: str) -> torch.Tensor:
    """uint8 0-255 (or other integers in 0..255) or float in [0, 1] to float32 in [0, 1]."""
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer pixels span [{lo}, {hi}]; expected 0..255 "
                             "(uint8).")
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if arr.dtype.kind == "f":
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            hint = " (it looks like [-1, 1]; save (x + 1) / 2)" if lo >= -1 and hi <= 1 else ""
            raise ValueError(f"{where}: float pixels span [{lo:.4g}, {hi:.4g}]; expected values "
                             f"in [0, 1]{hint}.")
        return torch.from_numpy(arr.astype(np.float32))
    raise ValueError(f"{where}: pixel dtype {arr.dtype} is not supported; use uint8 or float.")


def _to_nchw(x: torch.Tensor, where: str) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1..4 to (N, C, H, W)."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4:
        channels_last, channels_first = x.shape[-1] in (1, 2, 3, 4), x.shape[1] in (1, 2, 3, 4)
        if channels_last and not channels_first:
            return x.permute(0, 3, 1, 2).contiguous()
        if channels_first and not channels_last:
            return x
        if channels_first and channels_last:
            raise ValueError(f"{where}: shape {tuple(x.shape)} is ambiguous between (N, H, W, C) "
                             "and (N, C, H, W); store images as (N, C, H, W) with H, W > 4.")
    raise ValueError(f"{where}: array of shape {tuple(x.shape)} is not images; expected "
                     "(N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3 or 4.")


# ---------------------------------------------------------------------------------------------
# single images (for the edit commands)


def load_image(path: str | Path, image_size: int = 0, channels: int = 3,
               alpha_background: Literal["black", "white"] = "black") -> torch.Tensor:
    """Read one image file as (1, C, H, W) in [-1, 1], warning about each conversion it makes.

    image_size=0 keeps the native size (the image must then be square).
    """
    check_choice("channels", channels, (1, 3))
    x = torch.from_numpy(read_image_array(path)).movedim(-1, 0)[None]  # (1, c, h, w)
    c, (h, w) = x.shape[1], x.shape[-2:]
    if c in (2, 4):
        warnings.warn(f"{path}: composited its alpha channel onto {alpha_background}", stacklevel=2)
    if c - (c in (2, 4)) != channels:
        warnings.warn(f"{path}: converted {c - (c in (2, 4))} channel(s) to {channels}",
                      stacklevel=2)
    x = _to_channels(x, channels, 1.0 if alpha_background == "white" else 0.0)
    if image_size and (h, w) != (image_size, image_size):
        warnings.warn(f"{path}: resized {h}x{w} to {image_size}x{image_size} (shorter side to "
                      f"{image_size}, bicubic, then centre crop)", stacklevel=2)
        x = _resize_center_crop(x, image_size)
    elif not image_size and h != w:
        raise ValueError(f"{path} is {h}x{w}, not square; pass image_size to resize and crop it.")
    return x * 2 - 1


def save_image(x: torch.Tensor, path: str | Path) -> Path:
    """Write one image (C, H, W) or (1, C, H, W) in [-1, 1] to path (format from the suffix)."""
    from PIL import Image
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"save_image writes one image but got a batch of {x.shape[0]}; "
                             "use diffusekit.viz.save_grid for several.")
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects (C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    pixels = to_pixels(x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels).save(path)
    return path
