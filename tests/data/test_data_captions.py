"""Captions from metadata columns: caption_column, image_column, caption_template; saved in the config."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, load_dataset, open_dataset
from diffusekit.data.captions import format_caption
from repo_paths import SHARED

ROWS = [  # in file order a, b, c
    {"file_name": "a.png", "text": "thumbs up", "name": "thumbs up", "style": "noto", "skin_tone": "dark"},
    {"file_name": "b.png", "text": "grinning face", "name": "grinning face", "style": "twemoji", "skin_tone": None},
    {"file_name": "c.png", "text": "red apple", "name": "red apple", "style": "noto", "skin_tone": None},
]


def _folder(root: Path, rows=ROWS, metadata="jsonl", image_key="file_name") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        Image.fromarray(np.full((4, 4, 3), 60 * i, np.uint8)).save(root / row[image_key])
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        header = list(rows[0])
        lines = [",".join(header)] + [",".join("" if r.get(k) is None else str(r[k]) for k in header) for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_template_formats_each_rows_columns(tmp_path, metadata):
    root = _folder(tmp_path / "d", metadata=metadata)
    ds = load_dataset(DataConfig(source=str(root), caption_template="{text}, {style} style"))
    assert ds.captions == [f"{r['text']}, {r['style']} style" for r in ROWS]
    # a null skin tone (JSON null, empty CSV cell) leaves its part of the template out with its comma
    ds = load_dataset(DataConfig(source=str(root), caption_template="{name}, {skin_tone} skin tone, {style} style"))
    assert ds.captions == ["thumbs up, dark skin tone, noto style", "grinning face, twemoji style",
                           "red apple, noto style"]
    # the columns stay attributes whatever the captions are built from
    assert ds.attributes["style"] == ["noto", "twemoji", "noto"]


def test_template_nulls_inside_a_part_and_at_the_ends():
    row = {"a": "x", "b": None, "n": 1234}
    assert format_caption("{a} {b} style", row, "r") == "x style"           # empty field, no double space
    assert format_caption("{b}, {a}", row, "r") == "x"                      # a leading part dropped
    assert format_caption("{a}, {b}", row, "r") == "x"                      # a trailing part dropped
    assert format_caption("{a}, {n:,} votes", row, "r") == "x, 1,234 votes"  # a comma inside braces is kept


def test_a_missing_column_names_the_row_the_column_and_the_columns(tmp_path):
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "style"}, dict(ROWS[2])]
    root = _folder(tmp_path / "d", rows)
    with pytest.raises(ValueError, match=r"metadata\.jsonl line 2 has no column 'style' .*its columns are "
                                         r"\['name', 'skin_tone', 'text'\]"):
        load_dataset(DataConfig(source=str(root), caption_template="{text}, {style} style"))


def test_caption_column_chooses_the_captions(tmp_path):
    root = _folder(tmp_path / "d")
    ds = load_dataset(DataConfig(source=str(root), caption_column="name"))
    assert ds.captions == [r["name"] for r in ROWS] and "name" not in ds.attributes
    with pytest.raises(ValueError, match=r"caption_column='title' is not a column of .*metadata\.jsonl; its columns "
                                         r"are \['name', 'skin_tone', 'style', 'text'\]"):
        load_dataset(DataConfig(source=str(root), caption_column="title"))


def test_a_caption_column_is_read_when_there_is_no_text_column_with_a_note(tmp_path):
    rows = [{"file_name": r["file_name"], "caption": r["text"], "style": r["style"]} for r in ROWS]
    root = _folder(tmp_path / "d", rows)
    ds = load_dataset(DataConfig(source=str(root)))
    assert ds.captions == [r["text"] for r in ROWS] and ds.attributes == {"style": [r["style"] for r in ROWS]}
    notes = [n for n in ds.notes if "'caption' column" in n]
    assert len(notes) == 1 and "caption_column" in notes[0]
    # said explicitly: the same captions, no note
    ds = load_dataset(DataConfig(source=str(root), caption_column="caption"))
    assert ds.captions == [r["text"] for r in ROWS] and not any("'caption' column" in n for n in ds.notes)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_image_column_names_the_images(tmp_path, metadata):
    rows = [{"path": f"img{i}.png", "text": r["text"]} for i, r in enumerate(ROWS)]
    root = _folder(tmp_path / "d", rows, metadata=metadata, image_key="path")
    ds = load_dataset(DataConfig(source=str(root), image_column="path"))
    assert ds.captions == [r["text"] for r in ROWS] and len(ds) == 3
    with pytest.raises(ValueError, match="file_name"):   # the default column is not there
        load_dataset(DataConfig(source=str(root)))


def test_streamed_folders_carry_the_same_captions(tmp_path):
    root = _folder(tmp_path / "d")
    cfg = DataConfig(source=str(root), caption_template="{text}, {style} style")
    stream = open_dataset(cfg, streaming=True)
    assert [stream.item(i)[2] for i in range(3)] == load_dataset(cfg).captions


def test_templates_over_text_files_and_shapes(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    for name, caption in (("a", "a cat"), ("b", "a dog")):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption)
    ds = load_dataset(DataConfig(source=str(root), caption_template="{text}, photo"))
    assert ds.captions == ["a cat, photo", "a dog, photo"]
    shapes = load_dataset(DataConfig(source="shapes", limit=4, caption_template="{colour} {shape}"))
    assert shapes.captions == [f"{c} {s}" for c, s in zip(shapes.attributes["colour"], shapes.attributes["shape"])]


def test_caption_options_on_sources_without_metadata_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"caption_template=.* reads metadata columns, but digits"):
        load_dataset(DataConfig(source="digits", caption_template="{text}"))
    root = tmp_path / "plain"
    root.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a.png")
    with pytest.raises(ValueError, match=r"caption_column='name' names a metadata column, but .* no metadata"):
        load_dataset(DataConfig(source=str(root), caption_column="name"))


@pytest.mark.parametrize("fields, match", [
    ({"caption_template": "{text"}, "not a format string"),
    ({"caption_template": "text, style style"}, "names no column"),
    ({"caption_template": "{} style"}, "without a column name"),
    ({"caption_column": ""}, "caption_column='' is empty"),
    ({"image_column": "text"}, "both 'text'"),
])
def test_bad_caption_settings_are_refused_in_the_config(fields, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**fields)


def test_the_new_fields_round_trip_and_old_configs_still_load(tmp_path):
    cfg = DataConfig(source="x", alpha_background="1,2,3", caption_column="name", image_column="path",
                     caption_template="{name}, {style} style")
    cfg.to_json(tmp_path / "config.json")
    assert DataConfig.from_json(tmp_path / "config.json") == cfg
    # a config.json written before these fields existed loads with their defaults
    old = {"source": "x", "kind": "auto", "image_size": 0, "crop": "center", "channels": 3, "class_labels": True,
           "split": "train", "limit": 0, "seed": 0, "hflip": False, "alpha_background": "white", "strict": False}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = DataConfig.from_json(tmp_path / "old.json")
    assert (loaded.alpha_background, loaded.caption_column, loaded.image_column, loaded.caption_template) == \
        ("white", "text", "file_name", "")
    # and the resolved config a data set hands to the run keeps them
    root = _folder(tmp_path / "d")
    ds = load_dataset(DataConfig(source=str(root), caption_template="{text}, {style} style", alpha_background="white"))
    assert ds.config.caption_template == "{text}, {style} style" and ds.config.alpha_background == "white"


def test_datasets_folders_take_the_same_options(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    pictures = [Image.fromarray(np.full((4, 4, 3), 50 * i, np.uint8)) for i in range(3)]
    table = {"picture": pictures, "caption": [r["text"] for r in ROWS], "style": [r["style"] for r in ROWS],
             "skin_tone": [r["skin_tone"] for r in ROWS]}
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string"),
                                  "style": datasets.Value("string"), "skin_tone": datasets.Value("string")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(DataConfig(source=str(tmp_path / "hf")))
    assert ds.captions == [r["text"] for r in ROWS] and any("'caption' column" in n for n in ds.notes)
    ds = load_dataset(DataConfig(source=str(tmp_path / "hf"), image_column="picture",
                                 caption_template="{caption}, {skin_tone} skin, {style} style"))
    assert ds.captions == ["thumbs up, dark skin, noto style", "grinning face, twemoji style", "red apple, noto style"]
    with pytest.raises(ValueError, match=r"image_column='photo' is not a column .*'picture'"):
        load_dataset(DataConfig(source=str(tmp_path / "hf"), image_column="photo"))


EMOJI = SHARED / "data" / "emoji"


@pytest.mark.skipif(not (EMOJI / "metadata.jsonl").is_file(),
                    reason=f"the emoji set is not beside the repository ({EMOJI} is absent)")
def test_the_emoji_set_reads_captions_from_a_template_and_as_colour():
    rows = [json.loads(line) for line in (EMOJI / "metadata.jsonl").read_text().splitlines() if line.strip()]
    first = sorted(rows, key=lambda r: r["file_name"])[:20]    # the folder reads in file order
    ds = load_dataset(DataConfig(source=str(EMOJI), limit=20, caption_template="{text}, {style} style",
                                 alpha_background="white"))
    assert len(ds) == 20 and ds.channels == 3 and ds.images.shape[1:] == (3, 64, 64)
    assert ds.captions == [f"{r['text']}, {r['style']} style" for r in first]
    assert ds.attributes["category"] == [r["category"] for r in first]
    # transparent corners composited onto white: the corner pixel is 1.0 in every channel
    assert (ds.images[:, :, 0, 0] == 1).all()


@pytest.mark.skipif(not (EMOJI / "metadata.jsonl").is_file(),
                    reason=f"the emoji set is not beside the repository ({EMOJI} is absent)")
def test_the_emoji_sets_la_and_palette_images_read_with_rgba_ones_as_colour(tmp_path):
    import shutil
    rows = [json.loads(line) for line in (EMOJI / "metadata.jsonl").read_text().splitlines() if line.strip()]
    picked = {}
    for r in rows:                                             # the first image of each PNG mode
        with Image.open(EMOJI / r["file_name"]) as img:
            picked.setdefault(img.mode, r)
        if len(picked) == 3:
            break
    assert set(picked) == {"RGBA", "LA", "P"}
    for r in picked.values():
        (tmp_path / r["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EMOJI / r["file_name"], tmp_path / r["file_name"])
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked.values()))
    ds = load_dataset(DataConfig(source=str(tmp_path), alpha_background="0,0,255"))
    assert ds.channels == 3 and any("alpha channel of 3 images onto 0,0,255" in n for n in ds.notes)
    assert (ds.images[:, :, 0, 0] == ds.images.new_tensor([-1.0, -1.0, 1.0])).all()   # corners: blue


def test_metadata_without_captions_still_reads_caption_files(tmp_path):
    rows = [{"file_name": r["file_name"], "style": r["style"]} for r in ROWS]
    root = _folder(tmp_path / "d", rows)
    for r in ROWS:
        (root / r["file_name"]).with_suffix(".txt").write_text(r["text"])
    ds = load_dataset(DataConfig(source=str(root)))
    assert ds.captions == [r["text"] for r in ROWS] and ds.attributes == {"style": [r["style"] for r in ROWS]}


def test_a_format_that_does_not_fit_a_value_names_the_row():
    with pytest.raises(ValueError, match=r"metadata\.jsonl line 4: caption_template='\{text:d\}' cannot format"):
        format_caption("{text:d}", {"text": "cat"}, "metadata.jsonl line 4")
