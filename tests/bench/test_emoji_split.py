"""emoji_split (bench/text_to_image_emoji.py): the split the text-to-image and fine-tuning benchmarks share;
and the per-name-frequency score the text-to-image benchmark reads the split with."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from text_to_image_emoji import TONES, caption, emoji_split  # noqa: E402


def _rows(n_plain=300, n_toned=60, n_flags=20):
    """Rows shaped like the emoji metadata: every name in two styles, toned names in five tones too."""
    rows = []
    for i in range(n_plain + n_toned + n_flags):
        name = f"flag {i}" if i >= n_plain + n_toned else f"emoji {i}"
        category = "Flags" if name.startswith("flag") else "Objects"
        tones = [None, *TONES] if n_plain <= i < n_plain + n_toned else [None]
        for style in ("noto", "twemoji"):
            for tone in tones:
                text = name if tone is None else f"{name}: {tone} skin tone"
                rows.append({"file_name": f"{style}/{len(rows)}.png", "text": text, "name": name, "style": style,
                             "category": category, "subcategory": "x", "skin_tone": tone})
    return rows


def test_split_is_deterministic_and_holds_out_what_it_names():
    rows = _rows()
    s = emoji_split(rows, seed=3)
    assert s["seen_prompts"] == emoji_split(rows, seed=3)["seen_prompts"]
    assert s["new_names"] != emoji_split(rows, seed=4)["new_names"]
    train = s["train_rows"]
    names = {r["name"] for r in train}
    assert len(s["new_names"]) == 8 and not names & set(s["new_names"])
    assert not any(n.startswith("flag") for n in s["new_names"])
    for name, tone in s["heldout_tone"]:
        kept = {r["skin_tone"] for r in train if r["name"] == name}
        assert tone not in kept and set(TONES) - {tone} <= kept
    for name, style in s["heldout_style"]:
        kept = {r["style"] for r in train if r["name"] == name}
        assert kept == {"noto", "twemoji"} - {style}
    groups = [set(s["new_names"]), {n for n, _ in s["heldout_tone"]}, {n for n, _ in s["heldout_style"]}]
    assert sum(map(len, groups)) == len(set().union(*groups)) == 8 + 40 + 40
    # nothing else is left out: the rows removed are exactly those of the new names and the held-out pairs
    tone, style = set(map(tuple, s["heldout_tone"])), set(map(tuple, s["heldout_style"]))
    removed = [r for r in rows if r["name"] in s["new_names"] or (r["name"], r["skin_tone"]) in tone
               or (r["name"], r["style"]) in style]
    assert len(train) == len(rows) - len(removed) and len(removed) >= 8 * 2 + 40 * 2 + 40
    assert len(s["seen_prompts"]) == 200 and len({r["name"] for r in s["seen_rows"]}) == 200
    assert all(r in train for r in s["seen_rows"])
    assert s["seen_prompts"][0] == caption(s["seen_rows"][0]) and s["seen_prompts"][0].endswith(" style")


def test_top5_by_count_bins_names_by_their_training_images():
    """Each sample falls in the bin of its name's training-image count; empty bins say so (nan, 0)."""
    import math
    import pytest
    import torch
    from emoji_t2i_score import top5_by_count
    train = [{"name": "rare"}, {"name": "rare"}] + [{"name": "common"}] * 12 + [{"name": "mid"}] * 4
    rows = [{"name": "rare"}, {"name": "rare"}, {"name": "common"}, {"name": "mid"}, {"name": "rare"}]
    hits = torch.tensor([True, False, True, False, False])
    out = top5_by_count(hits, rows, train)
    assert list(out) == ["1-2", "3-5", "6-10", ">10"]
    assert out["1-2"] == (pytest.approx(1 / 3), 3) and out["3-5"] == (0.0, 1) and out[">10"] == (1.0, 1)
    assert math.isnan(out["6-10"][0]) and out["6-10"][1] == 0
