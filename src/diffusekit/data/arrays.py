"""Sources that are arrays already: the built-in `digits`, MNIST IDX files, .npy/.npz files.

Each reader returns values in [0, 1] as (N, c, H, W) with c in 1..4, int64 labels or None,
the class names and notes on what it read.
"""
from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import torch

from diffusekit.data.config import DataConfig, idx_files_in

# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)


def load_digits_arrays(cfg: DataConfig):
    """scikit-learn's 8x8 digits: 1797 images, labels 0-9."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    # 8x8 values are counts 0..16 of set pixels in 4x4 blocks (UCI optdigits): scale to [0, 1]
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    notes = ["digits: scikit-learn load_digits, 0-16 -> [0, 1]"]
    return x, labels, [str(i) for i in range(10)], notes


# ---------------------------------------------------------------------------------------------
# IDX (MNIST format)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# MNIST calls its test split t10k
_IDX_SPLIT = {"train": "train", "test": "t10k", "t10k": "t10k"}


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


def _find_idx_pair(cfg: DataConfig) -> tuple[Path, Path | None]:
    """The images file and its labels file (None if absent) for an IDX source."""
    path = Path(cfg.source)
    if path.is_dir():
        split = _IDX_SPLIT[cfg.split]
        found = idx_files_in(path, split)
        if not found:
            raise FileNotFoundError(f"no {split}-images IDX file in {path} (looked for "
                                    f"{split}-images*idx3* such as {split}-images-idx3-"
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


def load_idx_arrays(cfg: DataConfig):
    """An IDX images file (a folder + split, or the file itself) and the labels file beside it."""
    images_path, labels_path = _find_idx_pair(cfg)
    arr = read_idx(images_path)
    if arr.ndim != 3:
        raise ValueError(f"{images_path} holds an array of shape {arr.shape}; expected images "
                         "(N, rows, cols).")
    x = array_to_unit(arr, str(images_path)).unsqueeze(1)
    labels, class_names = None, []
    if cfg.class_labels:
        if labels_path is None:
            warnings.warn(f"no labels file beside {images_path}; loading without labels", stacklevel=4)
        else:
            labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
            if len(labels) != len(x):
                raise ValueError(f"{labels_path} has {len(labels)} labels for the "
                                 f"{len(x)} images in {images_path}.")
            class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return x, labels, class_names, [f"read {len(x)} images from {images_path}"]


# ---------------------------------------------------------------------------------------------
# numpy arrays


def load_npy_arrays(cfg: DataConfig):
    """A .npy array of images, or a .npz with images (and labels) in it."""
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
    x = to_nchw(array_to_unit(arr, str(path)), str(path))
    class_names = []
    if labels is not None:
        if len(labels) != len(x):
            raise ValueError(f"{path} has {len(labels)} labels for {len(x)} images.")
        if labels.min() < 0:
            raise ValueError(f"{path} has negative labels (min {int(labels.min())}); "
                             "labels must be class indices 0..K-1.")
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return x, labels, class_names, [f"read {len(x)} images {tuple(x.shape[1:])} from {path}"]


def array_to_unit(arr: np.ndarray, where: str) -> torch.Tensor:
    """uint8 0-255 (or other integers in 0..255) or float in [0, 1] to float32 in [0, 1]."""
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer pixels span [{lo}, {hi}]; expected 0..255 (uint8).")
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if arr.dtype.kind == "f":
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            hint = " (it looks like [-1, 1]; save (x + 1) / 2)" if lo >= -1 and hi <= 1 else ""
            raise ValueError(f"{where}: float pixels span [{lo:.4g}, {hi:.4g}]; expected values "
                             f"in [0, 1]{hint}.")
        return torch.from_numpy(arr.astype(np.float32))
    raise ValueError(f"{where}: pixel dtype {arr.dtype} is not supported; use uint8 or float.")


def to_nchw(x: torch.Tensor, where: str) -> torch.Tensor:
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
