"""What a data set is: `DataConfig`, and which reader a source needs (`resolve_kind`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffusekit.config import Config, ConfigError, check_choice, check_range
from diffusekit.data.captions import template_fields
from diffusekit.data.images import BACKGROUND_FORMS, BACKGROUNDS, parse_background

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
ARRAY_EXTENSIONS = (".npy", ".npz")
BUILT_IN = ("digits", "shapes")


@dataclass
class DataConfig(Config):
    """Where the training images come from and how they are brought to one shape."""
    source: str = "digits"  # "digits", "shapes", an image folder, an IDX file or folder, .npy/.npz, parquet
    kind: Literal["auto", "digits", "shapes", "folder", "idx", "npy", "hf"] = "auto"  # auto: from source
    image_size: int = 0  # side of the square output images; 0 = the source's native size (one size only)
    crop: Literal["center", "random"] = "center"  # after the shorter side is resized to image_size
    channels: int = 0  # 0 = as the images are (colour 3, grayscale 1); 1 or 3 converts to that
    class_labels: bool = True  # keep labels: digits/IDX/npz labels, a metadata label column, sub-folders
    split: Literal["train", "test", "t10k"] = "train"  # train/ or test/ sub-folder; IDX t10k (= test)
    limit: int = 0  # keep at most this many images (the first, in file order); 0 = all (shapes: 10000)
    seed: int = 0  # which images a generated set (shapes) holds; independent of the training seed
    hflip: bool = False  # random horizontal flips when batches are drawn; never for digits or shapes
    alpha_background: str = "black"  # what transparent pixels become: "black", "white" or "R,G,B" (0-255 each)
    strict: bool = False  # an unreadable image is an error instead of a warning and a skip
    caption_column: str = "text"  # metadata column of the captions; "text" falls back to a "caption" column
    image_column: str = "file_name"  # metadata column naming each image (datasets folders: their Image column)
    caption_template: str = ""  # e.g. "{text}, {style} style": captions from metadata columns; "" = caption_column

    def validate(self) -> None:
        check_choice("channels", self.channels, (0, 1, 3))
        self.alpha_background = _canonical_background(self.alpha_background)
        for name in ("caption_column", "image_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name}={getattr(self, name)!r} is empty; name a metadata column, e.g. "
                                  f"{'text' if name == 'caption_column' else 'file_name'} (the default).")
        if self.caption_column == self.image_column:
            raise ConfigError(f"caption_column and image_column are both {self.caption_column!r}; the captions "
                              "and the image names are different columns.")
        if self.caption_template:
            template_fields(self.caption_template)
        check_range("image_size", self.image_size, lo=0)
        check_range("limit", self.limit, lo=0)
        check_range("seed", self.seed, lo=0)
        if self.hflip and "digits" in (self.kind, self.source):
            raise ConfigError("hflip=True with the digits source would train on mirrored digits; "
                              "set hflip=False (flips suit photos, not glyphs).")
        if self.hflip and "shapes" in (self.kind, self.source):
            raise ConfigError("hflip=True with the shapes source would mirror 'on the left' to the right "
                              "without changing the caption; set hflip=False.")
        if self.crop == "random" and not self.image_size:
            raise ConfigError("crop='random' needs image_size > 0 (images are resized so the shorter side "
                              "is image_size, then cropped); set image_size, for example 64.")


def _canonical_background(value: str) -> str:
    """ "black", "white", or "R,G,B" without spaces; ConfigError listing the allowed forms otherwise."""
    try:
        rgb = parse_background(value)
    except ValueError:
        raise ConfigError(f"alpha_background={value!r} is not a colour; give {BACKGROUND_FORMS}.") from None
    name = value.strip().lower()
    return name if name in BACKGROUNDS else ",".join(str(v) for v in rgb)


def resolve_kind(source: str, kind: str = "auto") -> str:
    """The reader a source needs: 'digits', 'shapes', 'folder', 'idx', 'npy' or 'hf'."""
    if kind != "auto":
        return kind
    if source in BUILT_IN:
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist; give 'digits', 'shapes', an image "
                                f"folder ({', '.join(IMAGE_EXTENSIONS)}), an IDX file or folder, "
                                f"or a .npy/.npz file.")
    if path.is_dir():
        if idx_files_in(path):
            return "idx"
        return "hf" if is_hf_folder(path) else "folder"
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        return "npy"
    if path.suffix.lower() == ".parquet":
        return "hf"
    if "idx" in path.name or "ubyte" in path.name:
        return "idx"
    raise ValueError(f"cannot tell what kind of data {source!r} is; expected a folder, an IDX "
                     f"file (name containing 'idx' or 'ubyte'), .npy/.npz or .parquet; set kind explicitly.")


def idx_files_in(folder: Path, split: str | None = None) -> list[Path]:
    """IDX image files in a folder, of one split ('train', 't10k') or all."""
    pattern = f"{split}-images*idx3*" if split else "*idx3*"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def is_hf_folder(folder: Path) -> bool:
    """Whether a folder is a `datasets` save_to_disk folder or holds parquet files and no images."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return True
    has_parquet = any(folder.rglob("*.parquet"))
    return has_parquet and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))
