"""Local Hugging Face `datasets` data: a `save_to_disk` folder or parquet files (optional extra).

Nothing is downloaded: the source is a path on this machine, read with the `datasets` library
(`pip install datasets`). The image column is the first of the `Image` feature type, or one named
image / img; labels come from `label` / `labels` (a ClassLabel keeps its names), captions from
`text` (or `caption`; `caption_column` / `caption_template` choose otherwise, as for a folder), and
other scalar columns become attributes, as in an image folder's metadata.
The images are then brought to one shape exactly as a folder's are (`load_folder`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from diffusekit.data.config import DataConfig
from diffusekit.data.dataset import ImageDataset, load_folder
from diffusekit.data.folder import SPLIT_FOLDERS, FolderIndex
from diffusekit.data.images import pil_channels, pil_to_array
from diffusekit.data.captions import captions_from_rows
from diffusekit.data.metadata import MetadataRow, attribute_columns, labels_from_column

IMAGE_COLUMNS, LABEL_COLUMNS = ("image", "img"), ("label", "labels")


def load_hf(cfg: DataConfig) -> ImageDataset:
    """Read a local `datasets` folder or parquet file(s) into memory as an ImageDataset."""
    table, where = open_hf(cfg)
    image_column = _image_column(table, where, cfg.image_column)
    if isinstance(table.features[image_column], datasets_image_type()):
        # undecoded ({bytes, path}): a corrupt image is then ours to skip, not an error mid-iteration
        table = table.cast_column(image_column, datasets_image_type()(decode=False))
    label_column = next((c for c in LABEL_COLUMNS if c in table.column_names), None)
    names = getattr(table.features.get(label_column), "names", None) if label_column else None
    pictures, rows, skipped = [], [], 0
    for i, row in enumerate(table):
        if cfg.limit and len(rows) >= cfg.limit:
            break
        try:
            picture = _as_pil(row.pop(image_column))
        except Exception as err:  # a corrupt image must not stop the whole data set
            if cfg.strict:
                raise ValueError(f"cannot read the image of {where} row {i}: {type(err).__name__}: {err}; fix "
                                 "or remove it, or set strict=False to skip unreadable images.") from None
            warnings.warn(f"skipping unreadable image at {where} row {i}: {type(err).__name__}: {err}",
                          stacklevel=3)
            skipped += 1
            continue
        columns = {("label" if k == label_column else k): v for k, v in row.items()}
        rows.append(MetadataRow(Path(f"{where}[{i}]"), f"{where} row {i}", columns))
        pictures.append(picture)
    if not rows:
        raise ValueError(f"{where} holds no readable images ({skipped} skipped).")
    labels, class_names = (None, [])
    if cfg.class_labels and label_column:
        labels, class_names = labels_from_column(rows)
        class_names = list(names) if names else class_names   # a ClassLabel's values index its names
    captions, caption_column, notes = captions_from_rows(rows, cfg.caption_column, cfg.caption_template)
    index = FolderIndex(Path(where), [r.path for r in rows], [pil_channels(p) for p in pictures],
                        [(p.height, p.width) for p in pictures], labels, class_names,
                        captions, attribute_columns(rows, caption_column),
                        [f"read {len(rows)} images from {where} (datasets)"] +
                        ([f"skipped {skipped} unreadable images"] if skipped else []) + notes)
    position = {path: k for k, path in enumerate(index.files)}
    read = lambda path: torch.from_numpy(pil_to_array(pictures[position[path]])).movedim(-1, 0)  # noqa: E731
    return load_folder(index, cfg, read=read)


def open_hf(cfg: DataConfig):
    """The `datasets.Dataset` of cfg's source and split, and a name for it in messages."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {cfg.source} needs the `datasets` library; pip install datasets "
                          "(or diffusekit's optional extra), or export the images to a folder.") from None
    path, split = Path(cfg.source), SPLIT_FOLDERS[cfg.split]
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has splits {sorted(loaded)} but no {split!r}; choose split="
                                 f"{sorted(loaded)[0]!r}.")
            return loaded[split], f"{path}[{split}]"
        return loaded, str(path)
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = _parquet_files(path, split)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    # the schema's "huggingface" metadata carries the features (Image, ClassLabel) when datasets wrote it
    return datasets.Dataset(table), str(path)


def _parquet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}.")
    # the Hub's layout: data/train-00000-of-00002.parquet, or train/*.parquet
    named = {s: [f for f in files if f.name.startswith(f"{s}-") or f.parent.name == s] for s in ("train", "test")}
    if not named["train"] and not named["test"]:
        if split == "train":
            return files
        raise FileNotFoundError(f"no test parquet files under {path} (test-*.parquet or test/*.parquet); "
                                "use split='train' for all of them.")
    if not named[split]:
        raise FileNotFoundError(f"no {split} parquet files under {path} ({split}-*.parquet or {split}/*.parquet).")
    return named[split]


def datasets_image_type():
    import datasets
    return datasets.Image


def _image_column(table, where: str, asked: str = "file_name") -> str:
    """The column holding the images: `asked` when the user named one, else the first Image-typed or image/img one."""
    if asked != "file_name":
        if asked not in table.column_names:
            raise ValueError(f"image_column={asked!r} is not a column of {where}; its columns are "
                             f"{table.column_names}. Choose the one that holds the images.")
        return asked
    typed = [name for name, feature in table.features.items() if isinstance(feature, datasets_image_type())]
    named = [name for name in IMAGE_COLUMNS if name in table.column_names]
    if not typed and not named:
        raise ValueError(f"{where} has columns {table.column_names} but no image column (of the Image "
                         "feature type, or named 'image'); it does not hold images.")
    return (typed or named)[0]


def _as_pil(value):
    """A PIL image from what a datasets row holds: a decoded image, or {bytes, path}."""
    import io

    from PIL import Image
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    raise ValueError(f"expected an image, got {type(value).__name__}")
