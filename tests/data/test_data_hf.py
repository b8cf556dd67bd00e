"""Local Hugging Face `datasets` data (optional extra), on data sets the tests build offline."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from diffusekit.data import DataConfig, load_dataset, resolve_kind, to_pixels

datasets = pytest.importorskip("datasets")


def _pictures(n, size=(6, 6)):
    return [Image.fromarray(np.full((*size, 3), (40 * i, 255 - 40 * i, 7), np.uint8)) for i in range(n)]


def _dataset(n=4, label_names=("cat", "dog")):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(label_names)),
                                  "caption": datasets.Value("string"), "score": datasets.Value("int32")})
    return datasets.Dataset.from_dict({"image": _pictures(n), "label": [i % 2 for i in range(n)],
                                       "caption": [f"picture {i}" for i in range(n)], "score": list(range(n))},
                                      features=features)


@pytest.fixture(autouse=True)
def _quiet():
    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _check(ds, n):
    assert ds.images.shape == (n, 3, 6, 6) and ds.channels == 3
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [i % 2 for i in range(n)]
    assert ds.captions == [f"picture {i}" for i in range(n)] and ds.attributes == {"score": list(range(n))}
    assert [tuple(p) for p in to_pixels(ds.images)[:, 0, 0]] == [(40 * i, 255 - 40 * i, 7) for i in range(n)]


def test_save_to_disk_folder_with_splits(tmp_path):
    datasets.DatasetDict({"train": _dataset(4), "test": _dataset(2)}).save_to_disk(str(tmp_path / "dd"))
    assert resolve_kind(str(tmp_path / "dd")) == "hf"
    _check(load_dataset(DataConfig(source=str(tmp_path / "dd"))), 4)
    _check(load_dataset(DataConfig(source=str(tmp_path / "dd"), split="test")), 2)
    single = tmp_path / "single"
    _dataset(3).save_to_disk(str(single))
    small = load_dataset(DataConfig(source=str(single), image_size=4, channels=1, limit=2))
    assert small.images.shape == (2, 1, 4, 4) and small.labels.tolist() == [0, 1]


def test_parquet_files_and_folders(tmp_path):
    _dataset(4).to_parquet(str(tmp_path / "one.parquet"))
    assert resolve_kind(str(tmp_path / "one.parquet")) == "hf"
    _check(load_dataset(DataConfig(source=str(tmp_path / "one.parquet"))), 4)
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    _dataset(4).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    _dataset(2).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    assert resolve_kind(str(tmp_path / "hub")) == "hf"
    _check(load_dataset(DataConfig(source=str(tmp_path / "hub"), split="test")), 2)


def test_plain_parquet_and_bad_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(picture):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()

    # written without datasets: images as {bytes, path} structs, string labels, a corrupt image
    blobs = [{"bytes": png(p), "path": None} for p in _pictures(3)] + [{"bytes": b"junk", "path": None}]
    pq.write_table(pa.table({"image": blobs, "label": ["b", "a", "b", "a"]}), tmp_path / "plain.parquet")
    with pytest.warns(UserWarning, match="row 3"):
        ds = load_dataset(DataConfig(source=str(tmp_path / "plain.parquet")))
    assert len(ds) == 3 and ds.class_names == ["a", "b"] and ds.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="row 3.*strict=False"):
        load_dataset(DataConfig(source=str(tmp_path / "plain.parquet"), strict=True))
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match="no image column"):
        load_dataset(DataConfig(source=str(tmp_path / "numbers.parquet")))
    datasets.DatasetDict({"train": _dataset(2)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['train'\] but no 'test'"):
        load_dataset(DataConfig(source=str(tmp_path / "dd"), split="test"))
