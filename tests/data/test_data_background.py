"""Transparent images composited onto the background a user chooses, in every PNG mode that carries alpha.

Each test image holds a transparent pixel, an opaque one and (where the mode allows) a half-transparent
one; the expected values are written out here as a * colour + (1 - a) * background in float64.
"""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, load_dataset, load_image, open_dataset

COLOUR, GREY, HALF = (200, 100, 50), 180, 128   # the pixels' colour, a grey level, alpha of the half pixel


def _save(img: Image.Image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _mode_images(folder):
    """One 3x3 PNG per mode with alpha, each row: pixel 0 transparent, 1 opaque, 2 half (binary-alpha modes: opaque).

    Returns {file name: (mode as reloaded, pixels as (R, G, B, A) per pixel)}.
    """
    rgba = [(*COLOUR, 0), (*COLOUR, 255), (*COLOUR, HALF)]
    la = [(GREY, 0), (GREY, 255), (GREY, HALF)]
    _save(Image.frombytes("RGBA", (3, 3), bytes(v for p in rgba * 3 for v in p)), folder / "rgba.png")
    _save(Image.frombytes("LA", (3, 3), bytes(v for p in la * 3 for v in p)), folder / "la.png")
    p = Image.frombytes("P", (3, 3), bytes([0, 1, 2] * 3))
    p.putpalette([*COLOUR, *COLOUR, *COLOUR] + [0] * (3 * 253))
    p.info["transparency"] = bytes([0, 255, HALF])          # a tRNS chunk: one alpha per palette entry
    _save(p, folder / "p.png")
    grey = Image.frombytes("L", (3, 3), bytes([7, GREY, GREY] * 3))
    grey.info["transparency"] = 7                            # tRNS: grey level 7 is transparent
    _save(grey, folder / "l_trns.png")
    rgb = Image.frombytes("RGB", (3, 3), bytes([1, 2, 3, *COLOUR, *COLOUR] * 3))
    rgb.info["transparency"] = (1, 2, 3)                     # tRNS: colour (1, 2, 3) is transparent
    _save(rgb, folder / "rgb_trns.png")
    grey_px = [(GREY,) * 3 + (a,) for a in (0, 255, 255)]
    return {"rgba.png": ("RGBA", [(*c[:3], c[3]) for c in rgba]),
            "la.png": ("LA", [(g, g, g, a) for g, a in la]),
            "p.png": ("P", [(*COLOUR, a) for a in (0, 255, HALF)]),
            "l_trns.png": ("L", grey_px),
            "rgb_trns.png": ("RGB", [(*COLOUR, a) for a in (0, 255, 255)])}


def _expected(pixel, background, channels=3):
    """a * colour + (1 - a) * background, mapped to [-1, 1]; grey images' colour is their level."""
    a = pixel[3] / 255
    colour = np.array(pixel[:3], np.float64) / 255
    bg = np.array(background, np.float64) / 255
    out = a * colour + (1 - a) * bg
    if channels == 1:
        out = out[:1] if np.ptp(out) == 0 else np.array([out @ [0.299, 0.587, 0.114]])
    return out * 2 - 1


def _check(images, names, pixels, background, channels=3):
    for i, name in enumerate(names):
        got = images[i, :, 0, :3].double()                  # (C, 3): the three pixels
        want = torch.tensor(np.stack([_expected(p, background, channels) for p in pixels[name][1]], -1))
        assert torch.allclose(got, want, atol=1e-5), (name, got, want)


@pytest.fixture
def modes(tmp_path):
    folder = tmp_path / "modes"
    pixels = _mode_images(folder)
    _save(Image.new("L", (3, 3), 90), folder / "opaque_l.png")
    _save(Image.new("RGB", (3, 3), (5, 60, 250)), folder / "opaque_rgb.png")
    pixels["opaque_l.png"] = ("L", [(90, 90, 90, 255)] * 3)
    pixels["opaque_rgb.png"] = ("RGB", [(5, 60, 250, 255)] * 3)
    return folder, pixels


def test_the_test_images_are_in_the_modes_they_claim(modes):
    folder, pixels = modes
    for name, (mode, _) in pixels.items():
        with Image.open(folder / name) as img:
            assert img.mode == mode, name
            assert ("transparency" in img.info) == (name in ("p.png", "l_trns.png", "rgb_trns.png"))


@pytest.mark.parametrize("background, rgb", [("black", (0, 0, 0)), ("white", (255, 255, 255)),
                                             ("10,200,30", (10, 200, 30))])
def test_every_mode_in_one_folder_is_composited_onto_the_background(modes, background, rgb):
    folder, pixels = modes
    ds = load_dataset(DataConfig(source=str(folder), alpha_background=background))
    names = sorted(pixels)
    assert ds.channels == 3                                  # one channel count: colour, as some images are
    _check(ds.images, names, pixels, rgb)
    assert any(f"alpha channel of 5 images onto {background}" in n for n in ds.notes)
    stream = open_dataset(DataConfig(source=str(folder), alpha_background=background), streaming=True)
    assert torch.equal(torch.stack([stream[i][0] for i in range(len(stream))]), ds.images)


def test_transparent_grey_images_stay_grey_on_a_grey_background_and_take_a_colour_one(tmp_path):
    folder = tmp_path / "grey"
    la = [(GREY, 0), (GREY, 255), (GREY, HALF)]
    _save(Image.frombytes("LA", (3, 3), bytes(v for p in la * 3 for v in p)), folder / "a.png")
    _save(Image.new("L", (3, 3), 40), folder / "b.png")
    pixels = {"a.png": ("LA", [(g, g, g, a) for g, a in la]), "b.png": ("L", [(40, 40, 40, 255)] * 3)}
    ds = load_dataset(DataConfig(source=str(folder), alpha_background="white"))
    assert ds.channels == 1
    _check(ds.images, ["a.png", "b.png"], pixels, (255, 255, 255), channels=1)
    # a colour background makes the transparent areas colour, so the set reads as RGB
    ds = load_dataset(DataConfig(source=str(folder), alpha_background="255,0,0"))
    assert ds.channels == 3 and any("colour background 255,0,0" in n for n in ds.notes)
    _check(ds.images, ["a.png", "b.png"], pixels, (255, 0, 0))
    # asked for grey: the colour background composited as its luma
    ds = load_dataset(DataConfig(source=str(folder), alpha_background="255,0,0", channels=1))
    _check(ds.images, ["a.png", "b.png"], pixels, (255, 0, 0), channels=1)


def test_single_images_and_arrays_use_the_background(tmp_path):
    rgba = [(*COLOUR, 0), (*COLOUR, 255), (*COLOUR, HALF)]
    path = _save(Image.frombytes("RGBA", (3, 3), bytes(v for p in rgba * 3 for v in p)), tmp_path / "one.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = load_image(path, alpha_background="0,0,255")
    assert any("onto 0,0,255" in str(w.message) for w in caught)
    _check(x, ["one"], {"one": ("RGBA", rgba)}, (0, 0, 255))
    # an (N, H, W, 4) uint8 array: the alpha is the last channel
    arr = np.array([[rgba * 2] * 6], np.uint8)               # (1, 6, 6, 4)
    np.save(tmp_path / "a.npy", arr)
    ds = load_dataset(DataConfig(source=str(tmp_path / "a.npy"), alpha_background="white"))
    _check(ds.images, ["one"], {"one": ("RGBA", rgba)}, (255, 255, 255))


def test_datasets_folders_use_the_background(tmp_path, modes):
    datasets = pytest.importorskip("datasets")
    folder, pixels = modes
    rgba = pixels["rgba.png"][1]
    picture = Image.frombytes("RGBA", (3, 3), bytes(v for p in rgba * 3 for v in p))
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"image": [picture]}, features=datasets.Features({"image": datasets.Image()})) \
        .save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(DataConfig(source=str(tmp_path / "hf"), alpha_background="10,200,30"))
    _check(ds.images, ["rgba"], {"rgba": ("RGBA", rgba)}, (10, 200, 30))


@pytest.mark.parametrize("value", ["red", "256,0,0", "1,2", "1,2,3,4", "-1,0,0", "0.5,0,0", ""])
def test_a_background_that_is_not_a_colour_is_refused_listing_the_forms(value):
    with pytest.raises(ConfigError, match=r'alpha_background=.*"black", "white" or "R,G,B"'):
        DataConfig(alpha_background=value)


def test_background_values_are_stored_in_one_spelling():
    assert DataConfig().alpha_background == "black"          # the default, as before
    assert DataConfig(alpha_background=" White ").alpha_background == "white"
    assert DataConfig(alpha_background="10, 20 ,30").alpha_background == "10,20,30"


def test_a_pipeline_reads_images_onto_the_background_its_run_was_trained_on(tmp_path):
    from types import SimpleNamespace

    from diffusekit import NoiseSchedule
    from diffusekit.pipeline import Pipeline
    rgba = [(*COLOUR, 0), (*COLOUR, 255), (*COLOUR, HALF)]
    path = _save(Image.frombytes("RGBA", (3, 3), bytes(v for p in rgba * 3 for v in p)), tmp_path / "up.png")
    run = SimpleNamespace(data=DataConfig(alpha_background="white"))
    pipe = Pipeline(lambda x, t, **c: x, NoiseSchedule.create("linear", 10), image_shape=(3, 3, 3), config=run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(pipe.load_image(path), ["up"], {"up": ("RGBA", rgba)}, (255, 255, 255))
        _check(pipe.load_image(path, alpha_background="0,0,255"), ["up"], {"up": ("RGBA", rgba)}, (0, 0, 255))
        bare = Pipeline(lambda x, t, **c: x, NoiseSchedule.create("linear", 10), image_shape=(3, 3, 3))
        _check(bare.load_image(path), ["up"], {"up": ("RGBA", rgba)}, (0, 0, 0))   # no run config: black
