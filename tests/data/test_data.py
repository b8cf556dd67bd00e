"""Data loading: every source ends as (N, C, H, W) float32 in [-1, 1] with the right labels."""
import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.config import ConfigError
from diffusekit.data import (DataConfig, ImageDataset, from_pixels, load_dataset, load_image,
                             read_idx, save_image, to_pixels)
from idx_files import idx_bytes
from repo_paths import SHARED

MNIST = SHARED / "data" / "mnist"


def test_digits():
    ds = load_dataset(DataConfig(source="digits"))
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)]
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    # 0..16 maps linearly: value v -> v / 8 - 1
    from sklearn.datasets import load_digits
    raw = torch.from_numpy(load_digits().images).float()
    torch.testing.assert_close(ds.images[:, 0], raw / 8 - 1)
    image, label = ds[5]
    assert image.shape == (1, 8, 8) and label == ds.labels[5]


def test_gray_sources_stay_one_channel(tmp_path):
    # channels=0 (the default) keeps what the images are: digits and IDX are grayscale
    ds = load_dataset(DataConfig(source="digits", limit=5))
    assert ds.channels == 1 and ds.config.channels == 1
    assert "channels: 1 (grayscale), as the images are" in ds.notes
    images = np.zeros((3, 4, 4), np.uint8)
    (tmp_path / "x-images-idx3-ubyte").write_bytes(idx_bytes(images))
    with pytest.warns(UserWarning, match="no labels file"):
        assert load_dataset(DataConfig(source=str(tmp_path / "x-images-idx3-ubyte"))).channels == 1
    rgb = np.zeros((5, 6, 6, 3), np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    assert load_dataset(DataConfig(source=str(tmp_path / "rgb.npy"))).channels == 3


def test_digits_options():
    ds = load_dataset(DataConfig(source="digits", image_size=16, channels=3, limit=20,
                                 class_labels=False))
    assert ds.images.shape == (20, 3, 16, 16) and ds.labels is None and ds.num_classes == 0
    assert ds[0][1] == -1
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert any("resized" in n for n in ds.notes) and any("limit" in n for n in ds.notes)
    with pytest.raises(ConfigError, match="hflip"):
        DataConfig(source="digits", hflip=True)
    with pytest.raises(ConfigError, match="channels"):
        DataConfig(channels=2)
    cfg = DataConfig(source="x", kind="folder", image_size=32)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_pixels_round_trip():
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    x = from_pixels(pixels)
    assert x.shape == (4, 3, 5, 6) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_pixels(x), pixels)
    assert from_pixels(pixels[0, :, :, 0]).shape == (1, 5, 6)


def _write(path: Path, array: np.ndarray, mode: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _image_folder(tmp_path: Path) -> Path:
    """Two classes, mixed formats, modes and sizes; every image is a flat colour."""
    root = tmp_path / "imgs"
    _write(root / "cats" / "a.png", np.full((20, 20), 200, np.uint8), "L")
    _write(root / "cats" / "b.jpg", np.full((16, 24, 3), (255, 0, 0), np.uint8), "RGB")
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :6, 3] = 255  # left half opaque red, right half transparent
    _write(root / "dogs" / "c.png", rgba, "RGBA")
    _write(root / "dogs" / "sub" / "d.webp", np.full((40, 30, 3), 255, np.uint8), "RGB")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def test_folder_with_classes(tmp_path):
    root = _image_folder(tmp_path)
    ds = load_dataset(DataConfig(source=str(root), image_size=8, channels=3))
    assert ds.images.shape == (4, 3, 8, 8)
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1, 1]
    pixels = to_pixels(ds.images)
    assert np.all(pixels[0] == 200)                      # gray replicated to RGB
    assert np.abs(pixels[1].astype(int) - [255, 0, 0]).max() <= 8  # JPEG red, roughly
    # RGBA composited on black: left edge red, right edge black
    assert tuple(pixels[2, 4, 0]) == (255, 0, 0) and tuple(pixels[2, 4, 7]) == (0, 0, 0)
    assert np.all(pixels[3] == 255)                      # WebP in a nested folder: class "dogs"
    white = load_dataset(DataConfig(source=str(root), image_size=8, channels=3,
                                    alpha_background="white"))
    assert tuple(to_pixels(white.images)[2, 4, 7]) == (255, 255, 255)


def test_folder_grayscale_and_luma(tmp_path):
    root = _image_folder(tmp_path)
    ds = load_dataset(DataConfig(source=str(root), image_size=8, channels=1, class_labels=False))
    assert ds.images.shape == (4, 1, 8, 8) and ds.labels is None
    # pure red has luma 0.299 * 255 = 76 (ITU-R 601-2)
    assert abs(int(to_pixels(ds.images)[1, 4, 4, 0]) - 76) <= 3


def test_folder_native_size_needs_one_size(tmp_path):
    root = _image_folder(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(DataConfig(source=str(root), channels=3))
    flat = tmp_path / "flat"
    for i in range(3):
        _write(flat / f"{i}.png", np.full((6, 6), 50 * i, np.uint8), "L")
    ds = load_dataset(DataConfig(source=str(flat)))
    assert ds.images.shape == (3, 1, 6, 6) and ds.labels is None  # no sub-folders, no labels


def test_corrupt_file_warned_and_skipped(tmp_path):
    root = _image_folder(tmp_path)
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(DataConfig(source=str(root), image_size=8, channels=3))
    messages = [str(w.message) for w in record]
    assert any("broken.png" in m for m in messages) and any("empty.jpg" in m for m in messages)
    assert any(m.startswith("skipped 2 of 6 files") for m in messages)
    assert len(ds) == 4


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.png.*\.webp.*empty"):
        load_dataset(DataConfig(source=str(tmp_path / "empty"), image_size=8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(DataConfig(source=str(tmp_path / "nope")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="could be read"):
        load_dataset(DataConfig(source=str(tmp_path / "bad"), image_size=8))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, size=7, dtype=np.uint8)
    assert idx_bytes(images)[:4] == struct.pack(">i", 2051)
    suffix = ".gz" if gz else ""
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        (tmp_path / (name + suffix)).write_bytes(gzip.compress(data) if gz else data)
    np.testing.assert_array_equal(read_idx(tmp_path / ("train-images-idx3-ubyte" + suffix)), images)
    # the folder + split form, and the direct images-file form (labels found beside it)
    for source in (tmp_path, tmp_path / ("train-images-idx3-ubyte" + suffix)):
        ds = load_dataset(DataConfig(source=str(source), image_size=4, split="train"))
        assert ds.images.shape == (7, 1, 4, 4) and ds.labels.tolist() == labels.tolist()
        assert ds.num_classes == int(labels.max()) + 1
    with pytest.raises(ValueError, match="not square"):  # 5x4 at native size
        load_dataset(DataConfig(source=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_dataset(DataConfig(source=str(tmp_path), kind="idx", split="t10k"))


def test_idx_native_square_and_errors(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images))
    with pytest.warns(UserWarning, match="no labels file"):
        ds = load_dataset(DataConfig(source=str(path)))
    np.testing.assert_array_equal(to_pixels(ds.images)[..., 0], images)
    path.write_bytes(idx_bytes(images)[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="no shared MNIST")
def test_real_mnist_t10k():
    ds = load_dataset(DataConfig(source=str(MNIST), split="t10k"))
    assert ds.images.shape == (10000, 1, 28, 28)
    counts = torch.bincount(ds.labels).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # mean pixel of the test set is 33.791 / 255 (shared/data/README.md)
    mean_pixel = ((ds.images + 1) * 127.5).mean().item()
    assert abs(mean_pixel - 33.791) < 0.01


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "nhwc1"])
@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_npy_layouts(tmp_path, layout, dtype):
    rng = np.random.default_rng(1)
    channels = 1 if layout in ("nhw", "nhwc1") else 3
    pixels = rng.integers(0, 256, size=(5, 6, 6, channels), dtype=np.uint8)  # (N, H, W, C)
    arr = {"nhw": pixels[..., 0], "nhwc": pixels, "nhwc1": pixels,
           "nchw": pixels.transpose(0, 3, 1, 2)}[layout]
    arr = arr if dtype == "uint8" else arr.astype(np.float32) / 255
    np.save(tmp_path / "x.npy", arr)
    ds = load_dataset(DataConfig(source=str(tmp_path / "x.npy"), channels=channels))
    assert ds.images.shape == (5, channels, 6, 6) and ds.labels is None
    np.testing.assert_array_equal(to_pixels(ds.images), pixels)


def test_npz_with_labels_and_errors(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=pixels, labels=np.array([0, 2, 1, 2]))
    ds = load_dataset(DataConfig(source=str(tmp_path / "a.npz")))
    assert ds.labels.tolist() == [0, 2, 1, 2] and ds.num_classes == 3
    np.savez(tmp_path / "b.npz", x=pixels.astype(np.float32) / 255, y=np.arange(4))
    ds = load_dataset(DataConfig(source=str(tmp_path / "b.npz"), channels=3, image_size=4))
    assert ds.images.shape == (4, 3, 4, 4) and ds.labels.tolist() == [0, 1, 2, 3]
    np.save(tmp_path / "c.npy", pixels.astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_dataset(DataConfig(source=str(tmp_path / "c.npy")))


def test_augment_hflip_is_seeded():
    x = torch.arange(16.0).view(2, 1, 2, 4).repeat(8, 1, 1, 1)
    ds = ImageDataset(x, hflip=True)
    a = ds.augment(x, torch.Generator().manual_seed(0))
    b = ds.augment(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    flipped = (a != x).flatten(1).any(1)
    assert 0 < flipped.sum() < len(x)
    torch.testing.assert_close(a[flipped], x[flipped].flip(-1))
    assert ImageDataset(x).augment(x) is x


def test_load_and_save_image(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 255
    _write(tmp_path / "in.png", rgba, "RGBA")
    with pytest.warns(UserWarning) as record:
        x = load_image(tmp_path / "in.png", image_size=8, channels=3)
    messages = " ".join(str(w.message) for w in record)
    assert "alpha" in messages and "resized 10x20 to 8x8" in messages
    assert x.shape == (1, 3, 8, 8)
    assert tuple(to_pixels(x)[0, 3, 3]) == (0, 255, 0)
    out = save_image(x, tmp_path / "out" / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already RGB and 8x8: nothing to convert, no warning
        y = load_image(out, image_size=8, channels=3)
    torch.testing.assert_close(y, x)
    assert load_image(out, channels=0).shape == (1, 3, 8, 8)   # channels=0: as the file is
    save_image(x[:, :1], tmp_path / "gray.png")
    with Image.open(tmp_path / "gray.png") as img:
        assert img.mode == "L"
    assert load_image(tmp_path / "gray.png", channels=0).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="save_grid"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "two.png")
