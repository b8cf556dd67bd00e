"""Text-to-image on the real emoji set (../shared/data/emoji): per training CPU-minute at 32 px.

The split shared with bench/finetune.py (`emoji_split`) is defined first; the benchmark follows.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

TEMPLATE = "{text}, {style} style"
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


def load_rows(data_dir) -> list[dict]:
    """The metadata rows of an emoji folder, in file order."""
    path = Path(data_dir) / "metadata.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: give --data the emoji folder (the one with metadata.jsonl).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def caption(row: dict, template: str = TEMPLATE) -> str:
    """The training caption of a metadata row, e.g. "thumbs up sign: dark skin tone, noto style"."""
    return template.format(**row)


def emoji_split(rows, seed=0, n_new_names=8, n_heldout_tone=40, n_heldout_style=40) -> dict:
    """Deterministic split of the emoji rows for the text-to-image and fine-tuning benchmarks.

    new_names: names left out entirely (every style and tone), among non-flag names with >= 2 styles;
    heldout_tone: (name, tone) pairs (single-person tones) left out; that name's other tones stay in;
    heldout_style: (name, style) pairs left out (every tone of the name in that style); the other style stays;
    the three sets use distinct names. train_rows: the rest, in file order. seen_prompts: 200 captions of
    train rows with distinct names (seen_rows: those rows, in the same order).
    """
    rng = random.Random(seed)
    styles, tones, category = defaultdict(set), defaultdict(set), {}
    for r in rows:
        styles[r["name"]].add(r["style"])
        category[r["name"]] = r["category"]
        if r["skin_tone"] in TONES:
            tones[r["name"]].add(r["skin_tone"])
    names = sorted(styles)
    new = rng.sample([n for n in names if len(styles[n]) >= 2 and category[n] != "Flags"], n_new_names)
    toned = [n for n in names if n not in new and len(tones[n]) == len(TONES)]
    tone_names = rng.sample(toned, n_heldout_tone)
    heldout_tone = [(n, rng.choice(TONES)) for n in tone_names]
    free = [n for n in names if n not in new and n not in tone_names and len(styles[n]) >= 2]
    heldout_style = [(n, rng.choice(sorted(styles[n]))) for n in rng.sample(free, n_heldout_style)]
    new_set, tone_set, style_set = set(new), set(heldout_tone), set(heldout_style)
    train_rows = [r for r in rows if r["name"] not in new_set and (r["name"], r["skin_tone"]) not in tone_set
                  and (r["name"], r["style"]) not in style_set]
    by_name = {}
    for r in train_rows:
        by_name.setdefault(r["name"], []).append(r)
    seen_rows = [rng.choice(by_name[n]) for n in rng.sample(sorted(by_name), 200)]
    return {"new_names": new, "heldout_tone": heldout_tone, "heldout_style": heldout_style,
            "train_rows": train_rows, "seen_prompts": [caption(r) for r in seen_rows], "seen_rows": seen_rows}
