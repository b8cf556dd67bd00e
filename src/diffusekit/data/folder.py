"""Image folders as the ecosystem writes them, indexed before any pixel is decoded.

Layouts (combinable):
  - images anywhere under the folder; sub-folder names are classes when every image is in one;
  - `metadata.jsonl` / `metadata.csv` (Hugging Face imagefolder): `file_name` plus `label`,
    `text` and attribute columns; when present it lists the data set and gives the labels;
  - `NAME.txt` beside `NAME.png`: the caption of that image;
  - `train/` and `test/` sub-folders: the splits (a class may then not be called train or test).
The index holds each file's stored channels and size from its header, so that both the in-memory
and the streaming data sets can settle the channels and the size before decoding anything.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffusekit.data.captions import captions_from_rows, template_over_columns
from diffusekit.data.config import IMAGE_EXTENSIONS, DataConfig
from diffusekit.data.images import color_channels, output_channels, probe_image
from diffusekit.data.metadata import (METADATA_FILES, MetadataRow, attribute_columns, find_metadata,
                                      labels_from_column, read_metadata, read_text_file)

SPLIT_FOLDERS = {"train": "train", "test": "test", "t10k": "test"}


@dataclass
class FolderIndex:
    """An image folder before decoding: its files in order and what is known about each."""
    root: Path
    files: list[Path]
    stored_channels: list[int]               # as read: 1 (L), 2 (LA), 3 (RGB), 4 (RGBA)
    sizes: list[tuple[int, int]]             # (height, width) as stored
    labels: list[int] | None = None
    class_names: list[str] = field(default_factory=list)
    captions: list[str] | None = None
    attributes: dict[str, list] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: list[int]) -> FolderIndex:
        """The index of the files at positions `keep`, in that order."""
        pick = lambda values: [values[i] for i in keep] if values is not None else None  # noqa: E731
        attributes = {k: pick(v) for k, v in self.attributes.items()} if self.attributes else None
        return replace(self, files=pick(self.files), stored_channels=pick(self.stored_channels),
                       sizes=pick(self.sizes), labels=pick(self.labels), captions=pick(self.captions),
                       attributes=attributes, notes=list(self.notes))


def index_folder(cfg: DataConfig) -> FolderIndex:
    """Find, label, caption and probe the images of the image folder `cfg.source`."""
    top = Path(cfg.source)
    if not top.is_dir():
        raise FileNotFoundError(f"image folder {top} does not exist or is not a folder.")
    root = split_root(top, cfg.split)
    everything = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in everything if p.suffix.lower() in IMAGE_EXTENSIONS]
    rows = _metadata_rows(top, root, cfg.image_column)
    notes = []
    if rows:
        rows.sort(key=lambda r: r.path)
        listed = {r.path for r in rows}
        unlisted = [p for p in images if p not in listed]
        if unlisted:
            warnings.warn(f"{len(unlisted)} images under {root} are not in its metadata (e.g. {unlisted[0]}); "
                          "they are left out", stacklevel=3)
        images = [r.path for r in rows]
        notes.append(f"metadata: {len(rows)} rows, columns {sorted({k for r in rows for k in r.columns})}")
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}, any case) found "
                                f"under {root} (searched sub-folders too); put the images in it, or give the folder that holds them.")
    labels, class_names = _labels(root, images, rows, cfg.class_labels)
    captions, attributes = _captions(root, images, everything, rows, cfg, notes)
    index = FolderIndex(root, images, [], [], labels, class_names, captions, attributes, notes)
    return _probe_all(index, cfg)


def _captions(root: Path, images: list[Path], everything: list[Path], rows: list[MetadataRow],
              cfg: DataConfig, notes: list[str]) -> tuple[list[str] | None, dict | None]:
    """(captions, attributes) from the metadata columns, or else from NAME.txt files; notes appended."""
    text_files = [p for p in everything if p.suffix == ".txt"]
    if rows:
        captions, column, more = captions_from_rows(rows, cfg.caption_column, cfg.caption_template)
        notes.extend(more)
        if captions is None:  # metadata without captions: NAME.txt files may hold them
            captions = _text_file_captions(images, text_files, cfg.strict)
        return captions, attribute_columns(rows, column)
    asked = [f"{name}={getattr(cfg, name)!r}" for name, default in
             (("image_column", "file_name"), ("caption_column", "text")) if getattr(cfg, name) != default]
    if asked:
        raise ValueError(f"{asked[0]} names a metadata column, but {root} has no metadata.jsonl or metadata.csv; "
                         "add one (a row per image: file_name and its columns), or leave the option out.")
    captions = _text_file_captions(images, text_files, cfg.strict)
    if cfg.caption_template and captions is None:
        raise ValueError(f"caption_template={cfg.caption_template!r} builds captions from metadata columns, but {root} "
                         "has no metadata.jsonl or metadata.csv and no NAME.txt captions; add a metadata file.")
    if cfg.caption_template:
        wheres = [str(p.with_suffix(".txt")) for p in images]
        captions = template_over_columns(cfg.caption_template, {"text": captions}, wheres)
    return captions, None


def split_root(root: Path, split: str) -> Path:
    """The folder of one split: root/train or root/test when root has split folders, else root."""
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in ("train", "test"))
    wanted = SPLIT_FOLDERS[split]
    if not present:
        if wanted == "train":
            return root
        raise FileNotFoundError(f"{root} has no test/ sub-folder for split={split!r}; put held-out images "
                                f"in {root / 'test'} and training images in {root / 'train'}, or use "
                                "split='train' for the whole folder.")
    if wanted not in present:
        raise FileNotFoundError(f"{root} has split folders {present} but no {wanted}/; add {root / wanted} "
                                f"or choose split={present[0]!r}.")
    return root / wanted


def _metadata_rows(top: Path, root: Path, image_column: str = "file_name") -> list[MetadataRow]:
    """Rows of the metadata files under the split folder, or of the top folder's own for this split."""
    files = find_metadata(root)
    if not files and root != top:
        files = [top / name for name in METADATA_FILES if (top / name).is_file()][:1]
    rows = [row for f in files for row in read_metadata(f, top, image_column)]
    return [r for r in rows if r.path.is_relative_to(root)]


def _labels(root: Path, images: list[Path], rows: list[MetadataRow], wanted: bool):
    """Labels from the metadata's label column, or else from class sub-folders; (None, []) if neither."""
    if not wanted:
        return None, []
    if rows:
        found = labels_from_column(rows)
        return found if found is not None else (None, [])
    top = {p: p.relative_to(root).parts[0] for p in images if len(p.relative_to(root).parts) > 1}
    if not top:
        return None, []
    loose = [p for p in images if p not in top]
    if loose:
        raise ValueError(f"{len(loose)} images sit directly in {root} (e.g. {loose[0].name}) while "
                         "others are in class sub-folders; move them into a sub-folder, or set "
                         "class_labels=False to ignore the sub-folder names.")
    class_names = sorted(set(top.values()))
    return [class_names.index(top[p]) for p in images], class_names


def _text_file_captions(images: list[Path], texts: list[Path], strict: bool) -> list[str] | None:
    """Captions from NAME.txt beside NAME.png; None when no image has one."""
    text_of = {p: p.with_suffix(".txt") for p in images}
    texts = set(texts)
    captioned = [p for p in images if text_of[p] in texts]
    if not captioned:
        return None
    # a caption file without its image, in a folder of captioned images, is a mistake worth naming
    folders, wanted = {p.parent for p in captioned}, set(text_of.values())
    orphans = sorted(t for t in texts if t.parent in folders and t not in wanted)
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise FileNotFoundError(f"caption file {orphans[0]}{more} has no image beside it (looked for "
                                f"{orphans[0].stem} with {', '.join(IMAGE_EXTENSIONS)}); add the image or "
                                "remove the caption file.")
    missing = [p for p in images if text_of[p] not in texts]
    if missing:
        message = (f"{len(missing)} of {len(images)} images have no caption file (e.g. {text_of[missing[0]]})")
        if strict:
            raise FileNotFoundError(message + "; write one per image (strict=True).")
        warnings.warn(message + '; they get the empty caption ""', stacklevel=4)
    return [read_text_file(text_of[p]).strip() if text_of[p] in texts else "" for p in images]


def _probe_all(index: FolderIndex, cfg: DataConfig) -> FolderIndex:
    """Read every header (up to `limit` readable ones); skip unreadable files, or raise if strict."""
    keep, skipped, probes, first_error = [], [], {}, ""
    for i, path in enumerate(index.files):
        if cfg.limit and len(keep) >= cfg.limit:
            break
        try:
            probes[i] = probe_image(path)
        except Exception as err:  # a corrupt file must not stop the whole data set
            if cfg.strict:
                raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}; fix or remove "
                                 "it, or set strict=False to skip unreadable images.") from None
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=4)
            skipped.append(path)
            first_error = first_error or f" (e.g. {err})"
            continue
        keep.append(i)
    if skipped:
        names = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} of {len(keep) + len(skipped)} files: {names}", stacklevel=4)
    if not keep:
        raise ValueError(f"none of the {len(index.files)} image files under {index.root} could be read{first_error}; "
                         "give a folder of PNG, JPEG or other images that Pillow opens.")
    found = len(index.files)
    index.stored_channels = [probes[i][0] if i in probes else 0 for i in range(found)]
    index.sizes = [probes[i][1:] if i in probes else (0, 0) for i in range(found)]
    index = index.subset(keep)
    index.notes.append(f"read {len(index)} images from {index.root}")
    if skipped:
        index.notes.append(f"skipped {len(skipped)} unreadable files")
    if cfg.limit and len(keep) + len(skipped) < found:
        index.notes.append(f"kept the first {cfg.limit} of {found} files (limit={cfg.limit})")
    return index


def resolve_channels(stored: list[int], requested: int, alpha_background: str) -> tuple[int, list[str]]:
    """The channels of the data set (requested, or 0: as the images are) and notes on conversions.

    Mixed modes read as one channel count: colour if any image is colour (or transparent grey
    images meet a colour background), grey otherwise; every alpha is composited onto the background.
    """
    colour = [color_channels(c) for c in stored]
    n_colour, n_alpha = sum(c == 3 for c in colour), sum(c in (2, 4) for c in stored)
    channels = requested or output_channels(stored, alpha_background)
    notes = []
    if requested == 0:
        what = "RGB" if channels == 3 else "grayscale"
        mixed = (f": {n_colour} colour and {len(colour) - n_colour} grayscale images, grayscale repeated "
                 "to RGB (set channels=1 for grayscale)") if 0 < n_colour < len(colour) else ", as the images are"
        if channels == 3 and not n_colour:
            mixed = (f": grayscale images with transparency on the colour background {alpha_background} "
                     "(set channels=1 for grayscale)")
        notes.append(f"channels: {channels} ({what}){mixed}")
    elif any(c != channels for c in colour):
        notes.append(f"converted {sum(c != channels for c in colour)} images to {channels} channel(s)")
    if n_alpha:
        notes.append(f"composited the alpha channel of {n_alpha} images onto {alpha_background}")
    return channels, notes


def resolve_size(index: FolderIndex, cfg: DataConfig) -> tuple[int, list[str]]:
    """The side of the data set's images; one native square size unless image_size is set."""
    size = cfg.image_size
    if size:
        resized = sum(s != (size, size) for s in index.sizes)
        notes = [f"resized {resized} images to {size}x{size} (shorter side, bicubic; {cfg.crop} crop)"]
        return size, notes if resized else []
    (h, w), example = index.sizes[0], min(min(s) for s in index.sizes)
    other = next((i for i, s in enumerate(index.sizes) if s != (h, w)), None)
    if other is not None:
        h2, w2 = index.sizes[other]
        raise ValueError(f"{index.files[other]} is {h2}x{w2} but {index.files[0]} is {h}x{w}; set "
                         f"image_size=N to resize the shorter side to N and crop all images to NxN "
                         f"(for example image_size={example}).")
    if h != w:
        raise ValueError(f"the images under {index.root} are {h}x{w}, not square; set image_size=N to "
                         f"resize and crop them (for example image_size={example}).")
    return h, []
