"""Scores of bench/finetune.py with the emoji reader (bench/emoji_reader.py): is the new emoji identified (the
reader's top 5 / top 1), are the seen prompts still drawn (adherence, FD), and are the new emoji's samples copies of
the images it was taught from (pixel distance to the nearest instance image, against the emoji's other renderings).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from emoji_reader import features, load_emoji, name_topk

from diffusekit.metrics import feature_stats, frechet_distance

TEMPLATE = "{text}, {style} style"         # the base's captions (EMOJI.md)


@torch.no_grad()
def draw(pipe, prompts: list[str], scale: float, seed: int, args) -> torch.Tensor:
    return pipe.sample(len(prompts), args.sampler, args.sample_steps, generator=torch.Generator().manual_seed(seed),
                       prompt=prompts, guidance_scale=scale)


def identified(reader, images: torch.Tensor, names: list[str]) -> dict:
    return {f"top{k}": name_topk(reader, images, names, k=k).float().mean().item() for k in (5, 1)}


def fd_to(reader, images: torch.Tensor, ref_stats) -> float:
    return frechet_distance(*feature_stats(features(reader, images).double().numpy()), *ref_stats)


def score(pipe, reader, name: str, prompt: str, seen: list[tuple[str, str]], ref_stats, args, seed: int,
          cache: Path) -> dict:
    """The new emoji at each guidance scale; the seen prompts at --forget-scale (adherence, FD). The samples are
    kept in `cache` (safetensors), so another reader scores them again without sampling."""
    from safetensors.torch import load_file, save_file
    cpu0, out = time.process_time(), {"new": {}}
    drawn = load_file(cache) if cache.exists() else {}
    for scale in args.scales:
        key = f"new-g{scale:g}-n{args.n_new}"
        if key not in drawn:
            drawn[key] = draw(pipe, [prompt] * args.n_new, scale, seed, args).contiguous()
        out["new"][f"{scale:g}"] = identified(reader, drawn[key], [name] * args.n_new)
    key = f"seen-g{args.forget_scale:g}"
    if key not in drawn:
        drawn[key] = draw(pipe, [p for p, _ in seen], args.forget_scale, seed + 1, args).contiguous()
    out["seen"] = {**identified(reader, drawn[key], [n for _, n in seen]), "fd": fd_to(reader, drawn[key], ref_stats),
                   "scale": args.forget_scale}
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(drawn, cache)
    out["eval_cpu_s"] = time.process_time() - cpu0
    return out


def nearest_rmse(images: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    """Each image's pixel RMSE (in [-1, 1] units) to its nearest instance image."""
    d = (images.flatten(1)[:, None] - instance.flatten(1)[None]).pow(2).mean(-1).sqrt()
    return d.min(1).values


def copy_scores(drawn: dict, instance: torch.Tensor, others: torch.Tensor, scales: list[float], n: int) -> dict:
    """How close the new emoji's samples are to the 4 images they were taught from. The yardstick is the emoji's
    OTHER real images (tones and styles not taught): `ref` is the median of their distances to the nearest
    instance image, and a sample closer than that is counted a copy (nearer a taught image than a typical genuine
    other rendering of the emoji is; the autoencoder's own reconstruction error, ~0.12 at 24.6 dB, is the floor
    even an exact copy cannot pass). Without other real images (an emoji with <= 4) only distances are given."""
    ref = float(nearest_rmse(others, instance).median()) if len(others) else None
    out = {"ref_rmse": ref, "others": len(others)}
    for scale in scales:
        d = nearest_rmse(drawn[f"new-g{scale:g}-n{n}"], instance)
        out[f"{scale:g}"] = {"median_rmse": float(d.median()),
                             "copy_share": float((d < ref).float().mean()) if ref is not None else None}
    return out


def real_rows_score(reader, data: Path, new_rows: list[dict], seen_rows: list[dict], ref_stats) -> dict:
    """The reader on real images: the new emoji's (every style and tone) and the 200 seen rows' (FD floor)."""
    new_images, _ = load_emoji(data, size=reader.size, rows=new_rows)
    seen_images, _ = load_emoji(data, size=reader.size, rows=seen_rows)
    return {"new": {"real": identified(reader, new_images, [r["name"] for r in new_rows])},
            "seen": {**identified(reader, seen_images, [r["name"] for r in seen_rows]),
                     "fd": fd_to(reader, seen_images, ref_stats)}}


def seen_pairs(rows: list[dict], prompts: list[str]) -> tuple[list[tuple[str, str]], list[dict]]:
    """(caption, name) of each seen prompt, and its row (found by the caption template over the metadata)."""
    by_caption = {TEMPLATE.format(**r): r for r in rows}
    missing = [p for p in prompts if p not in by_caption]
    if missing:
        raise SystemExit(f"{len(missing)} seen prompts are not captions {TEMPLATE!r} of any row, e.g. {missing[0]!r}.")
    return [(p, by_caption[p]["name"]) for p in prompts], [by_caption[p] for p in prompts]


def unknown_words(pipe, prompt: str) -> list[str]:
    """Words of the prompt a learned text encoder's vocabulary lacks (they read as one unknown token)."""
    text = getattr(pipe.config, "text", None)
    if text is None or text.kind != "learned":
        return []
    from diffusekit.nn.text import words
    return [w for w in words(prompt) if w not in set(text.vocab)]
