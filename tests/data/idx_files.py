"""IDX files (MNIST's format) for tests: one writer for every test that lays out a tiny MNIST-like folder.

Not a test module: the test folders are on sys.path (tests/conftest.py), so `from idx_files import write_idx`.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array) -> bytes:
    """The IDX encoding of a uint8 array: magic 0, 0, type 0x08 (uint8), ndim; big-endian int32 sizes; the bytes."""
    array = np.asarray(array).astype(np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.tobytes()


def write_idx(path: str | Path, array) -> Path:
    """array as an IDX file at path, gzipped when the name ends in .gz (as MNIST's downloads are)."""
    path, data = Path(path), idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path
