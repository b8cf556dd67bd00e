"""Image data sets as tensors in [-1, 1]: folders, MNIST IDX, .npy/.npz, parquet, built-in `digits` and `shapes`.

One home per concept:
  config.py     DataConfig (what the data are and how they are shaped), resolve_kind
  images.py     one image: files, pixels <-> tensors, channels, resize, crop and flip transforms
  metadata.py   metadata.jsonl / metadata.csv (Hugging Face imagefolder): labels, captions, attributes
  captions.py   captions from metadata columns: caption_column and caption_template
  folder.py     image folders indexed before decoding: splits, classes, captions, channels, sizes
  arrays.py     digits, IDX and numpy readers
  shapes.py     the built-in captioned `shapes` set and write_shapes_folder
  dataset.py    ImageDataset (in memory) and load_folder
  sources.py    load_dataset: every kind of source into memory
  streaming.py  StreamingImageFolder (decoded per item) and open_dataset (memory or disk)
  batches.py    DataOrder and BatchSource: the batch of each training step, the same in memory or streamed
  split.py      split_heldout: the IDX test split, or a seeded held-out share
  hf.py         local Hugging Face `datasets` folders and parquet files (optional extra)
"""
from diffusekit.data.arrays import read_idx
from diffusekit.data.batches import Batch, BatchSource, DataOrder
from diffusekit.data.config import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, DataConfig, resolve_kind
from diffusekit.data.dataset import DataInfo, ImageDataset, load_folder
from diffusekit.data.sources import load_dataset
from diffusekit.data.folder import FolderIndex, index_folder
from diffusekit.data.images import (LUMA_WEIGHTS, ImageFileError, augment_item, center_crop, fit_image, from_pixels,
                                    load_image, random_crop, random_hflip, read_image, read_image_array,
                                    resize_center_crop, save_image, to_pixels, write_pixels)
from diffusekit.data.shapes import generate_shapes, write_shapes_folder
from diffusekit.data.streaming import StreamingImageFolder, open_dataset
from diffusekit.data.split import split_heldout

__all__ = ["ARRAY_EXTENSIONS", "IMAGE_EXTENSIONS", "LUMA_WEIGHTS", "Batch", "BatchSource", "DataConfig", "DataOrder",
           "DataInfo", "FolderIndex", "ImageDataset", "ImageFileError", "StreamingImageFolder", "augment_item", "center_crop",
           "fit_image", "from_pixels", "generate_shapes", "index_folder", "load_dataset", "load_folder",
           "load_image", "open_dataset", "random_crop", "random_hflip", "read_idx", "read_image",
           "read_image_array", "resize_center_crop", "resolve_kind", "save_image", "split_heldout", "to_pixels",
           "write_pixels", "write_shapes_folder"]
