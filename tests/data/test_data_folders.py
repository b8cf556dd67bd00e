"""Image folders as the ecosystem writes them: metadata, captions, splits, colour, sizes, bad input."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, load_dataset, open_dataset, resolve_kind, to_pixels


def _png(path: Path, value, size=(6, 6), mode="RGB") -> Path:
    """A flat image: value is a gray level (mode L) or an RGB(A) tuple."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": (), "LA": (2,), "RGB": (3,), "RGBA": (4,)}[mode]
    Image.fromarray(np.full((*size, *channels), value, np.uint8), mode=mode).save(path)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _colour_folder(root: Path) -> Path:
    """Three flat RGB images a, b, c with distinct colours (red, green, blue)."""
    for name, colour in zip("abc", [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _png(root / f"{name}.png", colour)
    return root


def test_metadata_jsonl_labels_captions_attributes(tmp_path):
    root = _colour_folder(tmp_path / "d")
    _png(root / "unlisted.png", (9, 9, 9))
    _jsonl(root / "metadata.jsonl", [
        {"file_name": "c.png", "label": "sea", "text": "blue", "mood": "calm"},
        "",  # blank lines are allowed
        {"file_name": "a.png", "label": "fire", "text": "red", "mood": "hot"},
        {"file_name": "b.png", "label": "sea", "text": "", "mood": "calm"}])
    with pytest.warns(UserWarning, match=r"1 images .* not in its metadata .*unlisted\.png"):
        ds = load_dataset(DataConfig(source=str(root)))
    assert len(ds) == 3 and ds.channels == 3
    # in file order: a, b, c; string labels become sorted class names
    assert ds.class_names == ["fire", "sea"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.captions == ["red", "", "blue"]
    assert ds.attributes == {"mood": ["hot", "calm", "calm"]}
    assert [tuple(p) for p in to_pixels(ds.images)[:, 0, 0]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    (root / "unlisted.png").unlink()
    assert load_dataset(DataConfig(source=str(root), class_labels=False)).labels is None


def test_metadata_csv_with_integer_labels(tmp_path):
    root = _colour_folder(tmp_path / "d")
    (root / "metadata.csv").write_text('file_name,label,text\na.png,2,"red, bright"\nb.png,0,green\n'
                                       "c.png,2,blue\n")
    ds = load_dataset(DataConfig(source=str(root)))
    # integer labels are class indices: K = max + 1 classes
    assert ds.labels.tolist() == [2, 0, 2] and ds.class_names == ["0", "1", "2"]
    assert ds.captions == ["red, bright", "green", "blue"]


def test_metadata_in_subfolders_and_without_labels(tmp_path):
    root = tmp_path / "d"
    _png(root / "x" / "one.png", (10, 10, 10))
    _png(root / "y" / "two.png", (20, 20, 20))
    _jsonl(root / "x" / "metadata.jsonl", [{"file_name": "one.png", "text": "first"}])
    _jsonl(root / "y" / "metadata.jsonl", [{"file_name": "two.png", "text": "second"}])
    ds = load_dataset(DataConfig(source=str(root)))
    # with metadata, labels come from its label column only, not from sub-folder names
    assert ds.labels is None and ds.captions == ["first", "second"]


def test_text_file_captions(tmp_path):
    root = _colour_folder(tmp_path / "d")
    (root / "a.txt").write_text("a red square\n")
    (root / "b.txt").write_text("a green square")
    with pytest.warns(UserWarning, match=r"1 of 3 images have no caption file .*c\.txt"):
        ds = load_dataset(DataConfig(source=str(root)))
    assert ds.captions == ["a red square", "a green square", ""]
    with pytest.raises(FileNotFoundError, match=r"c\.txt.*strict"):
        load_dataset(DataConfig(source=str(root), strict=True))
    (root / "c.txt").write_text("a blue square")
    (root / "ghost.txt").write_text("an image that is not there")
    with pytest.raises(FileNotFoundError, match=r"ghost\.txt has no image"):
        load_dataset(DataConfig(source=str(root)))


def test_train_test_splits(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _png(root / split / ("cat" if i % 2 else "dog") / f"{i}.png", (i, i, i))
    train = load_dataset(DataConfig(source=str(root)))
    test = load_dataset(DataConfig(source=str(root), split="test"))
    assert len(train) == 3 and len(test) == 2
    assert train.class_names == test.class_names == ["cat", "dog"]   # classes, not the split names
    assert load_dataset(DataConfig(source=str(root), split="t10k")).labels.tolist() == test.labels.tolist()
    only_train = tmp_path / "e"
    _png(only_train / "train" / "0.png", (1, 1, 1))
    with pytest.raises(FileNotFoundError, match=r"split folders \['train'\] but no test/"):
        load_dataset(DataConfig(source=str(only_train), split="test"))
    flat = _colour_folder(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="no test/ sub-folder"):
        load_dataset(DataConfig(source=str(flat), split="test"))


def test_split_metadata_at_the_top(tmp_path):
    root = tmp_path / "d"
    _png(root / "train" / "a.png", (1, 1, 1))
    _png(root / "test" / "b.png", (2, 2, 2))
    _jsonl(root / "metadata.jsonl", [{"file_name": "train/a.png", "text": "train image"},
                                     {"file_name": "test/b.png", "text": "test image"}])
    assert load_dataset(DataConfig(source=str(root), split="test")).captions == ["test image"]


@pytest.mark.parametrize("line, message", [
    ('{"file_name": "a.png"', r"line 2 is not JSON"),
    ('["a.png"]', r"line 2 is a JSON list, not an object"),
    ('{"text": "no file"}', r"line 2 has no file_name"),
    ('{"file_name": "nope.png"}', r"line 2: file_name 'nope.png' does not exist"),
    ('{"file_name": "a.png"}', r"line 2: 'a.png' is listed twice \(also at line 1\)"),
])
def test_bad_metadata_lines(tmp_path, line, message):
    root = _colour_folder(tmp_path / "d")
    _jsonl(root / "metadata.jsonl", ['{"file_name": "a.png"}', line])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_dataset(DataConfig(source=str(root)))


@pytest.mark.filterwarnings("ignore:.*not in its metadata")
def test_bad_label_and_caption_columns(tmp_path):
    root = _colour_folder(tmp_path / "d")
    meta = root / "metadata.jsonl"
    _jsonl(meta, [{"file_name": "a.png", "label": 1}, {"file_name": "b.png", "label": "dog"}])
    with pytest.raises(ValueError, match=r"label column mixes types \(int at .*line 1: 1; str at .*line 2"):
        load_dataset(DataConfig(source=str(root)))
    _jsonl(meta, [{"file_name": "a.png", "label": 1}, {"file_name": "b.png"}])
    with pytest.raises(ValueError, match=r"line 2 has no 'label' while other rows do"):
        load_dataset(DataConfig(source=str(root)))
    _jsonl(meta, [{"file_name": "a.png", "label": -1}])
    with pytest.raises(ValueError, match="negative"):
        load_dataset(DataConfig(source=str(root)))
    _jsonl(meta, [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": None}])
    with pytest.raises(ValueError, match=r"line 2 has no 'text'"):
        load_dataset(DataConfig(source=str(root)))
    meta.unlink()
    (root / "metadata.csv").write_text("file_name,label\na.png,3\nb.png,dog\n")
    with pytest.raises(ValueError, match=r"mixes types \(int at .*line 2: '3'; str at .*line 3"):
        load_dataset(DataConfig(source=str(root)))
    (root / "metadata.csv").write_text("name,label\na.png,3\n")
    with pytest.raises(ValueError, match="without file_name"):
        load_dataset(DataConfig(source=str(root)))
    _jsonl(meta, [{"file_name": "a.png"}])
    with pytest.raises(ValueError, match="both metadata.jsonl and metadata.csv"):
        load_dataset(DataConfig(source=str(root)))


def test_colour_follows_the_data(tmp_path):
    gray = tmp_path / "gray"
    for i in range(2):
        _png(gray / f"{i}.png", 100, mode="L")
    ds = load_dataset(DataConfig(source=str(gray)))
    assert ds.channels == 1 and ds.config.channels == 1
    assert any(n.startswith("channels: 1 (grayscale), as the images are") for n in ds.notes)
    rgb = _colour_folder(tmp_path / "rgb")
    ds = load_dataset(DataConfig(source=str(rgb)))
    assert ds.channels == 3 and any(n.startswith("channels: 3 (RGB)") for n in ds.notes)
    # RGBA composited on the chosen background and counted as colour; gray is repeated to RGB
    _png(rgb / "d.png", (0, 255, 0, 0), mode="RGBA")
    _png(rgb / "e.png", 70, mode="L")
    for background, value in (("black", 0), ("white", 255)):
        ds = load_dataset(DataConfig(source=str(rgb), alpha_background=background))
        pixels = to_pixels(ds.images)
        assert ds.channels == 3 and tuple(pixels[3, 0, 0]) == (value,) * 3
        assert tuple(pixels[4, 0, 0]) == (70, 70, 70)
        assert any("1 grayscale" in n and "channels=1" in n for n in ds.notes)
        assert any("alpha channel of 1 images onto " + background in n for n in ds.notes)
    # an explicit choice still converts
    ds = load_dataset(DataConfig(source=str(rgb), channels=1))
    assert ds.channels == 1 and abs(int(to_pixels(ds.images)[0, 0, 0, 0]) - 76) <= 1  # red's luma
    assert load_dataset(DataConfig(source=str(gray), channels=3)).channels == 3
    with pytest.raises(ConfigError, match="channels"):
        DataConfig(channels=4)


def test_mixed_sizes_need_image_size(tmp_path):
    root = tmp_path / "d"
    _png(root / "a.png", (1, 2, 3), size=(8, 8))
    _png(root / "b.png", (1, 2, 3), size=(6, 10))
    with pytest.raises(ValueError, match=r"b\.png is 6x10 but .*a\.png is 8x8; set image_size=N .*image_size=6"):
        load_dataset(DataConfig(source=str(root)))
    ds = load_dataset(DataConfig(source=str(root), image_size=6))
    assert ds.images.shape == (2, 3, 6, 6) and ds.uncropped is None
    assert any("resized 2 images to 6x6" in n and "center crop" in n for n in ds.notes)
    wide = tmp_path / "wide"
    _png(wide / "a.png", 5, size=(6, 10), mode="L")
    with pytest.raises(ValueError, match=r"are 6x10, not square; set image_size=N"):
        load_dataset(DataConfig(source=str(wide)))


def test_random_crop_keeps_the_longer_side(tmp_path):
    root = tmp_path / "d"
    pixels = np.zeros((8, 16), np.uint8)
    pixels[:, 8:] = 255
    _png(root / "a.png", pixels, size=(8, 16), mode="L")
    _png(root / "b.png", 30, size=(8, 8), mode="L")
    ds = load_dataset(DataConfig(source=str(root), image_size=8, crop="random"))
    assert ds.images.shape == (2, 1, 8, 8) and ds.crop == "random"
    assert [tuple(x.shape) for x in ds.uncropped] == [(1, 8, 16), (1, 8, 8)]
    torch.testing.assert_close(ds.images[0], ds.uncropped[0][..., 4:12])   # images: the centre crops
    with pytest.raises(ConfigError, match="crop='random' needs image_size"):
        DataConfig(source=str(root), crop="random")


def test_corrupt_and_zero_byte_images(tmp_path):
    root = _colour_folder(tmp_path / "d")
    (root / "zero.png").write_bytes(b"")
    (root / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(DataConfig(source=str(root)))
    messages = [str(w.message) for w in record]
    assert any("zero.png" in m for m in messages) and any("junk.jpg" in m for m in messages)
    assert len(ds) == 3 and any("skipped 2 unreadable" in n for n in ds.notes)
    with pytest.raises(ValueError, match=r"cannot read image .*junk\.jpg.*strict=False"):
        load_dataset(DataConfig(source=str(root), strict=True))
    # a readable header over broken pixels is caught when decoding, and skipped too
    good = (root / "a.png").read_bytes()
    (root / "zero.png").write_bytes(good[:len(good) // 2])
    (root / "junk.jpg").unlink()
    with pytest.warns(UserWarning, match=r"zero\.png"):
        assert len(load_dataset(DataConfig(source=str(root)))) == 3
    with pytest.raises(ValueError, match=r"zero\.png"):
        load_dataset(DataConfig(source=str(root), strict=True))


def test_limit_and_kinds(tmp_path):
    root = _colour_folder(tmp_path / "d")
    ds = load_dataset(DataConfig(source=str(root), limit=2))
    assert len(ds) == 2 and any("limit=2" in n for n in ds.notes)
    assert resolve_kind(str(root)) == "folder" and resolve_kind("shapes") == "shapes"
    assert resolve_kind("digits") == "digits" and resolve_kind(str(root), "npy") == "npy"
    assert resolve_kind(str(root), "auto") == "folder"


def test_open_dataset_chooses_by_size(tmp_path):
    root = _colour_folder(tmp_path / "d")
    small = open_dataset(DataConfig(source=str(root)))
    assert type(small).__name__ == "ImageDataset" and any("held in memory" in n for n in small.notes)
    big = open_dataset(DataConfig(source=str(root)), max_memory_bytes=100)   # 3 * 3 * 6 * 6 * 4 > 100
    assert type(big).__name__ == "StreamingImageFolder" and any("streamed" in n for n in big.notes)
    assert type(open_dataset(DataConfig(source=str(root)), streaming=True)).__name__ == "StreamingImageFolder"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        digits = open_dataset(DataConfig(source="digits"), streaming=True)
    assert digits.channels == 1 and any("image folders only" in n for n in digits.notes)
