"""Metadata rows that point outside the data folder, CSV rows cut by commas, non-UTF-8 files, unreadable folders.

Each bad input must be refused with a message that names the row (file and line) or the file, the
real problem and the fix; nothing outside the folder may ever be read as training data.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.data import DataConfig, load_dataset, to_pixels


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8), mode="L").save(path)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    """tmp/data with a.png (gray 10) and b.png (gray 20); tmp/outside.png (gray 200) beside it."""
    _png(tmp_path / "data" / "a.png", 10)
    _png(tmp_path / "data" / "b.png", 20)
    _png(tmp_path / "outside.png", 200)
    return tmp_path / "data"


def _load(root: Path):
    return load_dataset(DataConfig(source=str(root), channels=1))


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "../../../../etc/passwd"])
def test_relative_file_name_leading_out_of_the_folder_is_refused_naming_the_row(data, name):
    _jsonl(data / "metadata.jsonl", [{"file_name": "a.png"}, {"file_name": name}])
    with pytest.raises(ValueError) as err:
        _load(data)
    message = str(err.value)
    assert "metadata.jsonl line 2" in message and repr(name) in message
    assert "outside the data folder" in message and "relative to the metadata file" in message


def test_absolute_file_name_outside_is_refused_not_dropped(data):
    outside = str(data.parent / "outside.png")
    _jsonl(data / "metadata.jsonl", [{"file_name": "a.png"}, {"file_name": "b.png"}, {"file_name": outside}])
    with pytest.raises(ValueError, match=r"metadata.jsonl line 3: file_name .*outside\.png.* outside the data folder"):
        _load(data)


def test_absolute_file_name_inside_the_folder_is_the_same_image(data):
    _jsonl(data / "metadata.jsonl", [{"file_name": str((data / "b.png").resolve()), "text": "bee"},
                                     {"file_name": "a.png", "text": "ay"}])
    ds = _load(data)
    # file order a, b; the absolute row is b.png itself, gray 20, with its caption
    assert ds.captions == ["ay", "bee"]
    assert to_pixels(ds.images)[:, 0, 0, 0].tolist() == [10, 20]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
def test_symlink_inside_the_folder_leading_out_is_refused(data):
    try:
        (data / "link.png").symlink_to(data.parent / "outside.png")
    except OSError as e:  # e.g. Windows without the privilege
        pytest.skip(f"cannot create a symlink here: {e}")
    _jsonl(data / "metadata.jsonl", [{"file_name": "a.png"}, {"file_name": "link.png"}])
    with pytest.raises(ValueError, match=r"line 2: file_name 'link.png' is outside the data folder .*leads to .*outside\.png"):
        _load(data)


def test_split_rows_of_the_top_metadata_still_pick_their_split(tmp_path):
    # a top-level metadata file names train/ and test/ images: each split keeps its own rows
    root = tmp_path / "d"
    _png(root / "train" / "a.png", 10)
    _png(root / "test" / "b.png", 20)
    _jsonl(root / "metadata.jsonl", [{"file_name": "train/a.png", "text": "tr"},
                                     {"file_name": "test/./b.png", "text": "te"}])
    assert load_dataset(DataConfig(source=str(root), channels=1)).captions == ["tr"]
    assert load_dataset(DataConfig(source=str(root), channels=1, split="test")).captions == ["te"]


def test_csv_caption_with_unquoted_comma_is_refused_naming_the_line(data):
    (data / "metadata.csv").write_text('file_name,text\na.png,"a cat, sleeping"\nb.png,a dog, running\n')
    with pytest.raises(ValueError) as err:
        _load(data)
    message = str(err.value)
    assert "metadata.csv line 3 has 3 fields but the header has 2" in message
    assert "double quotes" in message


def test_csv_row_with_too_few_fields_is_refused(data):
    (data / "metadata.csv").write_text("file_name,text,label\na.png,ay,0\nb.png,bee\n")
    with pytest.raises(ValueError, match=r"metadata.csv line 3 has 2 fields but the header has 3"):
        _load(data)


def test_csv_quoted_commas_and_multiline_captions_are_kept_whole(data):
    # a quoted caption may hold commas, quotes and a line break; the next row's line number counts them
    (data / "metadata.csv").write_text('file_name,text\na.png,"a cat, ""Tom"",\nsleeping"\nb.png,dog\n')
    ds = _load(data)
    assert ds.captions == ['a cat, "Tom",\nsleeping', "dog"]
    (data / "metadata.csv").write_text('file_name,text\na.png,"a cat,\nsleeping"\nb.png,dog,x\n')
    with pytest.raises(ValueError, match="metadata.csv line 4 has 3 fields"):
        _load(data)


def test_csv_with_a_byte_order_mark_reads_its_header(data):
    (data / "metadata.csv").write_bytes("file_name,text\na.png,café\nb.png,b\n".encode("utf-8-sig"))
    assert _load(data).captions == ["café", "b"]


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv"])
def test_latin1_metadata_names_the_file_and_says_utf8(data, name):
    text = ('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "caf\u00e9"}\n'
            if name.endswith("jsonl") else "file_name,text\na.png,ok\nb.png,caf\u00e9\n")
    (data / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as err:
        _load(data)
    message = str(err.value)
    bad_line = 3 if name.endswith("csv") else 2
    assert str(data / name) in message and f"line {bad_line}" in message
    assert "not UTF-8" in message and "save it as UTF-8" in message


def test_latin1_caption_file_names_the_file(data):
    (data / "a.txt").write_text("ok")
    (data / "b.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"b\.txt is not UTF-8 .*save it as UTF-8"):
        _load(data)


def test_folder_of_unreadable_files_names_one_and_the_fix(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.png").write_bytes(b"not a png")
    (root / "b.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        with pytest.raises(ValueError) as err:
            _load(root)
    message = str(err.value)
    assert "none of the 2 image files" in message and "a.png cannot be read as an image" in message
    assert "PNG, JPEG" in message


def test_empty_folder_names_it_and_the_fix(tmp_path):
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "notes.md").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no image files .* under .*empty .*put the images in it"):
        _load(root)


def test_corrupt_image_in_strict_mode_names_the_file(data):
    (data / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"cannot read image .*c\.png.*set strict=False"):
        load_dataset(DataConfig(source=str(data), channels=1, strict=True))
