"""bench/emoji_reader.py on a tiny hand-made emoji folder (8x8 PNG in RGBA, LA and P modes): reading
on white, the held-out split, augmentations that keep a white background, the saved reader
(safetensors + json, reused, read back exactly) and what its FD helpers compute."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repo_paths import REPO, SHARED

sys.path.insert(0, str(REPO / "bench"))
import emoji_reader as er  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def write_folder(root, n_per=6):
    """Two 'names' (a red or blue square), two styles (RGBA / LA or P files), transparent corners."""
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(n_per):
            style = "noto" if i % 2 else "twemoji"
            a = np.zeros((8, 8, 4), np.uint8)
            a[2:6, 2:6] = (*rgb, 255)
            img = Image.fromarray(a, "RGBA")
            if name == "blue" and i == 0:
                img = img.convert("LA")            # grey with alpha: a different stored mode
            path = root / style / f"{name}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            rows.append({"file_name": f"{style}/{name}{i}.png", "text": name, "name": name, "style": style,
                         "category": "Symbols", "subcategory": "x", "skin_tone": "dark" if i == 3 else None})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_load_emoji_on_white_in_the_rows_order(tmp_path):
    rows = write_folder(tmp_path)
    images, got = er.load_emoji(tmp_path, size=8)
    assert images.shape == (12, 3, 8, 8) and len(got) == 12
    assert torch.all(images[:, :, 0, 0] == 1)                    # transparent corner -> white
    by_file = {r["file_name"]: r for r in got}
    assert by_file["noto/red1.png"]["style"] == "noto" and by_file["noto/red3.png"]["skin_tone"] == "dark"
    red = images[[r["file_name"] for r in got].index("noto/red1.png")]
    assert red[0, 4, 4] > 0.6 and red[2, 4, 4] < -0.6            # the red square stays red
    pick = [rows[5], rows[0]]
    sub, sub_rows = er.load_emoji(tmp_path, size=4, rows=pick)
    assert [r["file_name"] for r in sub_rows] == [rows[5]["file_name"], rows[0]["file_name"]]
    assert sub.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="does not list"):
        er.load_emoji(tmp_path, size=8, rows=[{"file_name": "nope.png"}])


def test_heldout_split_and_augment_keep_what_they_must():
    train, held = er.heldout_split(100, seed=3)
    assert len(held) == 10 and len(train) == 90 and not set(train.tolist()) & set(held.tolist())
    assert torch.equal(er.heldout_split(100, seed=3)[1], held)
    white = torch.ones(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(er.augment(white, g, noise=0.0), white, atol=1e-6)   # white fill, no colour change
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(er.augment(x, g, shift=0.0, scale=0.0, noise=0.0), x, atol=1e-5)


def test_blurs_keep_flat_images_and_fd_is_zero_on_itself():
    flat = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(er.gaussian_blur(flat, 1.0), flat, atol=1e-6)
    assert torch.allclose(er.blur16(flat), flat, atol=1e-5)
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1
    blurred = er.gaussian_blur(edge, 1.0)
    assert 0 < blurred[0, 0, 0, 3] < 0.5 < blurred[0, 0, 0, 4] < 1
    f = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert er.frechet(f, f) < 1e-8 and er.frechet(f, f + 1) == pytest.approx(5.0, rel=1e-6)


def test_trained_reader_is_saved_reused_and_read_back(tmp_path):
    write_folder(tmp_path / "data")
    out = er.train_reader(tmp_path / "data", tmp_path / "reader", size=8, steps=40, batch_size=12, width=4,
                          feature_dim=8, lr=1e-2)
    assert sorted(p.name for p in out.iterdir()) == ["reader.json", "reader.safetensors"]
    record = er.load_record(out)
    assert record["vocab"]["name"] == ["blue", "red"] and record["n_heldout"] == 1
    assert set(record["heldout_accuracy"]) == {*er.HEADS, "name_top5"}
    stamp = (out / "reader.safetensors").stat().st_mtime_ns
    assert er.train_reader(tmp_path / "data", out, size=8, steps=1) == out          # finished: reused
    assert (out / "reader.safetensors").stat().st_mtime_ns == stamp
    reader = er.load_reader(out)
    images, rows = er.load_emoji(tmp_path / "data", size=8)
    logits = er.read(reader, images)
    assert logits["name"].shape == (12, 2) and logits["tone"].shape == (12, 2)
    assert torch.allclose(er.features(reader, images), logits["features"])
    # red and blue squares on white: 40 steps learn the name
    assert (logits["name"].argmax(1) == er.label_tensors(rows, reader.vocab)["name"]).float().mean() == 1
    big = er.resize_to(images, 16)                                # another size is resized to reader.size
    assert er.features(reader, big).shape == (12, 8)
    hits = er.name_topk(reader, images, [r["name"] for r in rows[:11]] + ["no such emoji"], k=1)
    assert hits[:11].all() and not hits[11]


def test_load_reader_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji_reader.py train"):
        er.load_reader(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "emoji" / "metadata.jsonl").is_file(), reason="needs ../shared/data/emoji")
def test_the_real_folder_reads_as_its_readme_says():
    rows = [json.loads(line) for line in (SHARED / "data/emoji/metadata.jsonl").read_text().splitlines()[:40]]
    images, got = er.load_emoji(SHARED / "data/emoji", size=32, rows=rows)
    assert images.shape == (40, 3, 32, 32) and [r["name"] for r in got] == [r["name"] for r in rows]
    assert (images[:, :, 0, 0] > 0.95).all()                      # corners are transparent: white
