"""The built-in `shapes` set against its spec (issue 9), and its folder form against the built-in one."""
import json

import numpy as np
import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, generate_shapes, load_dataset, write_shapes_folder
from diffusekit.data.shapes import ATTRIBUTES, COLOURS, POSITIONS, draw_spec

N = 300
SIDES = {"small": (7, 10), "large": (13, 16)}
CENTRES = {"left": (9, 16), "right": (23, 16), "top": (16, 9), "bottom": (16, 23), "center": (16, 16)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}


@pytest.fixture(scope="module")
def shapes():
    images, captions, attributes = generate_shapes(N, seed=3)
    return images.numpy(), captions, attributes


def _lit_box(image: np.ndarray):
    """(left, top, right, bottom) of the lit pixels of (3, H, W), in pixel-edge coordinates."""
    rows, cols = np.nonzero(image.max(axis=0) > 0.02)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def test_deterministic_and_prefix_stable():
    a, captions_a, _ = generate_shapes(20, seed=5)
    b, captions_b, _ = generate_shapes(30, seed=5)
    torch.testing.assert_close(a, b[:20], rtol=0, atol=0)     # image i depends on (seed, i) only
    assert captions_a == captions_b[:20]
    c, captions_c, _ = generate_shapes(20, seed=6)
    assert not torch.equal(a, c) and captions_a != captions_c
    test, _, _ = generate_shapes(20, seed=5, split="test")
    assert not torch.equal(a, test)                           # the test split is another stream


def test_every_value_appears(shapes):
    _, _, attributes = shapes
    for name, values in ATTRIBUTES.items():
        assert set(attributes[name]) == set(values), name
    assert set(ATTRIBUTES["colour"]) == set(COLOURS) and set(ATTRIBUTES["position"]) == set(POSITIONS)


def test_captions_match_attributes(shapes):
    _, captions, attributes = shapes
    for i, caption in enumerate(captions):
        a = {k: v[i] for k, v in attributes.items()}
        assert caption == f"a {a['size']} {a['colour']} {a['shape']} {PHRASES[a['position']]}"


def test_images_follow_the_spec(shapes):
    images, _, attributes = shapes
    assert images.shape == (N, 3, 32, 32) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    for i, image in enumerate(images):
        size, colour, position = (attributes[k][i] for k in ("size", "colour", "position"))
        left, top, right, bottom = _lit_box(image)
        lo, hi = SIDES[size]
        # a side of s px covers at most s + 2 pixel columns (when it starts and ends mid-pixel)
        assert lo - 1 <= right - left <= hi + 2 and lo - 1 <= bottom - top <= hi + 2, (i, size)
        cx, cy = CENTRES[position]
        assert abs((left + right) / 2 - cx) <= 1.5 + 1 and abs((top + bottom) / 2 - cy) <= 1.5 + 1, (i, position)
        # the brightest pixel is fully covered: the named colour times a brightness in [0.75, 1]
        peak = image.reshape(3, -1)[:, image.sum(axis=0).argmax()]
        expected = np.array(COLOURS[colour], np.float32)
        brightness = peak.max()
        assert 0.75 - 1e-6 <= brightness <= 1 + 1e-6
        np.testing.assert_allclose(peak, expected * brightness, atol=1e-6)
        # every lit pixel has that hue: other channels stay black
        assert np.all(image[expected == 0] == 0)


def test_edges_are_anti_aliased(shapes):
    images, _, attributes = shapes
    for i, image in enumerate(images[:50]):
        values = image.max(axis=0)
        peak = values.max()
        partial = (values > 0.02 * peak) & (values < 0.98 * peak)
        assert partial.sum() >= 4, i   # some edge pixels are partly covered


def test_triangles_are_upright(shapes):
    images, _, attributes = shapes
    triangles = [i for i, s in enumerate(attributes["shape"]) if s == "triangle" and attributes["size"][i] == "large"]
    assert len(triangles) >= 5
    for i in triangles:
        lit = images[i].max(axis=0) > 0.02
        widths = [row.sum() for row in lit if row.any()]
        assert all(b >= a for a, b in zip(widths, widths[1:])), widths   # the lit width grows downwards
        assert widths[-1] >= 12 and widths[0] <= 4


def test_spec_geometry_ranges():
    specs = [draw_spec(i, seed=1) for i in range(500)]
    for s in specs:
        lo, hi = SIDES[s.size]
        cx, cy = CENTRES[s.position]
        assert lo <= s.side <= hi and abs(s.cx - cx) <= 1.5 and abs(s.cy - cy) <= 1.5
        assert 0.75 <= s.brightness <= 1


def test_built_in_source(shapes):
    ds = load_dataset(DataConfig(source="shapes", limit=N, seed=3))
    assert ds.images.shape == (N, 3, 32, 32) and ds.channels == 3 and ds.labels is None
    torch.testing.assert_close(ds.images, torch.from_numpy(shapes[0]) * 2 - 1)
    assert ds.captions == shapes[1] and ds.attributes == shapes[2]
    assert any("shapes" in n for n in ds.notes)
    gray = load_dataset(DataConfig(source="shapes", limit=4, channels=1, image_size=16))
    assert gray.images.shape == (4, 1, 16, 16)
    with pytest.raises(ConfigError, match="hflip"):
        DataConfig(source="shapes", hflip=True)


def test_folder_matches_built_in(tmp_path):
    out = write_shapes_folder(tmp_path / "shapes", n=40, seed=2)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"file_name", "text", "size", "colour", "shape", "position"}
    folder = load_dataset(DataConfig(source=str(out)))
    built_in = load_dataset(DataConfig(source="shapes", limit=40, seed=2))
    # PNG holds round(v * 255): within half a level, i.e. 1/255 in [-1, 1]
    torch.testing.assert_close(folder.images, built_in.images, rtol=0, atol=1 / 255 + 1e-6)
    assert folder.captions == built_in.captions and folder.attributes == built_in.attributes
    with pytest.raises(FileExistsError, match="not empty"):
        write_shapes_folder(out, n=2)
