"""Scoring for bench/text_to_image_emoji.py with the emoji reader (bench/emoji_reader.py).

Real reference: the real images (all 7,562, white background) split in two seeded random halves A and B.
  fd_halves   FD(A, B): the two-real-halves FD of issue 20's goal (3,781 against 3,781 images);
  fd_real_n   FD(n images of A, B): real images at the sample count, the floor at that n;
  fd          FD(n samples, B): the samples' prompts are the captions of n random rows of the whole set.
Seen prompts (the split's 200 captions of training rows, `per_prompt` samples each): the asked name in the
reader's top 1 / top 5, category, style and tone top 1. Held-out (name, tone) pairs: every caption of the
pair (both styles), scored for tone (and name top 5); held-out (name, style) pairs: every caption of the
pair, scored for style and name top 5. Results are cached in RUN/eval.json by a key of the settings.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from emoji_reader import HEADS, features, frechet, load_emoji, read, row_labels
from text_to_image_emoji import caption

HALF_SEED = 0


def reader_id(reader) -> str:
    """A short hash of the reader's weights: caches of scores are kept per reader."""
    import hashlib
    h = hashlib.sha256()
    for v in reader.state_dict().values():
        h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()[:10]


def real_reference(data_dir, reader, n: int, cache: Path) -> dict:
    """Reader features of the real halves (cached in `cache`), and the FDs of real images."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"real-features-{reader_id(reader)}.pt"
    if path.exists():
        feats = torch.load(path, weights_only=True)
    else:
        images, rows = load_emoji(data_dir, size=32)
        feats = {"all": features(reader, images), "file_names": [r["file_name"] for r in rows]}
        torch.save(feats, path)
    perm = torch.randperm(len(feats["all"]), generator=torch.Generator().manual_seed(HALF_SEED))
    a, b = feats["all"][perm[: len(perm) // 2]], feats["all"][perm[len(perm) // 2:]]
    stats_path = cache / f"real-fd-{reader_id(reader)}-{n}.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
    else:
        stats = {"fd_halves": frechet(a, b), "fd_real_n": frechet(a[:n], b), "n_half": len(a), "n": n}
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return {"half_b": b, **stats}


def prompt_sets(split: dict, rows: list[dict], n_fd: int, per_prompt: int) -> dict[str, list[dict]]:
    """The rows each score prompts with (one sample per row entry): fd, seen, tone, style."""
    g = torch.Generator().manual_seed(1)
    fd_rows = [rows[i] for i in torch.randperm(len(rows), generator=g)[:n_fd].tolist()]
    tone = set(map(tuple, split["heldout_tone"]))
    style = set(map(tuple, split["heldout_style"]))
    tone_rows = [r for r in rows if (r["name"], r["skin_tone"]) in tone]
    style_rows = [r for r in rows if (r["name"], r["style"]) in style]
    rep = lambda rs, k: [r for r in rs for _ in range(k)]          # noqa: E731
    return {"fd": fd_rows, "seen": rep(split["seen_rows"], per_prompt), "tone": rep(tone_rows, per_prompt),
            "style": rep(style_rows, per_prompt)}


def sample(pipe, rows: list[dict], scale: float, steps: int, seed: int) -> torch.Tensor:
    return pipe.sample(len(rows), "dpmpp_2m", steps, generator=torch.Generator().manual_seed(seed),
                       prompt=[caption(r) for r in rows], guidance_scale=scale, batch_size=200)


def _targets(reader, head: str, rows: list[dict]) -> torch.Tensor:
    index = {v: i for i, v in enumerate(reader.vocab[head])}
    return torch.tensor([index.get(row_labels(r)[head], -1) for r in rows])


def name_top5_hits(reader, name_logits: torch.Tensor, rows: list[dict]) -> torch.Tensor:
    """Per sample: is the row's name among the reader's 5 most likely names."""
    return (name_logits.topk(5, dim=1).indices == _targets(reader, "name", rows)[:, None]).any(1)


def head_scores(reader, images: torch.Tensor, rows: list[dict]) -> dict[str, float]:
    """Top-1 per head and the name's top 5 against the rows' labels (the reader's vocabularies)."""
    logits = read(reader, images)
    out = {f"{h}_top1": float((logits[h].argmax(1) == _targets(reader, h, rows)).float().mean()) for h in HEADS}
    out["name_top5"] = float(name_top5_hits(reader, logits["name"], rows).float().mean())
    return out


COUNT_BINS = ((1, 2), (3, 5), (6, 10), (11, None))       # training images of the asked name
COUNT_LABELS = [f"{lo}-{hi}" if hi else f">{lo - 1}" for lo, hi in COUNT_BINS]


def top5_by_count(hits: torch.Tensor, rows: list[dict], train_rows: list[dict]) -> dict[str, tuple[float, int]]:
    """The name top-5 share (nan where no sample) and the number of samples per bin of how many training
    images the asked name has: separates names the UNet saw once or twice from names it saw in every tone."""
    from collections import Counter
    count = Counter(r["name"] for r in train_rows)
    out = {}
    for (lo, hi), label in zip(COUNT_BINS, COUNT_LABELS):
        mask = torch.tensor([lo <= count[r["name"]] and (hi is None or count[r["name"]] <= hi) for r in rows])
        share = float(hits[mask].float().mean()) if mask.any() else float("nan")
        out[label] = (share, int(mask.sum()))
    return out


def real_rows_scores(data_dir, reader, split: dict, rows: list[dict], cache: Path) -> dict:
    """The same scores for the REAL images of each prompt set (one per row): what the reader gives the truth."""
    path = cache / f"real-scores-{reader_id(reader)}.json"
    if path.exists():
        return json.loads(path.read_text())
    r = {}
    for name, set_rows in prompt_sets(split, rows, 1000, 1).items():
        images, _ = load_emoji(data_dir, size=32, rows=set_rows)
        r.update({f"{name}_{k}": v for k, v in head_scores(reader, images, set_rows).items()})
    path.write_text(json.dumps(r, indent=2) + "\n")
    return r


def generate(folder: Path, split: dict, rows: list[dict], scale: float, n_fd: int, per_prompt: int,
             steps: int = 20) -> dict:
    """The samples of every prompt set at one guidance scale, as uint8, cached in folder/samples-KEY.pt
    (so another reader scores them without sampling again), and the sampling CPU seconds per image."""
    from diffusekit.pipeline import Pipeline
    path = folder / f"samples-{n_fd}-{per_prompt}-dpmpp_2m-{steps}-g{scale:g}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    pipe = Pipeline.load(folder, device="cpu")
    out, cpu0 = {}, time.process_time()
    for i, (name, set_rows) in enumerate(prompt_sets(split, rows, n_fd, per_prompt).items()):
        images = sample(pipe, set_rows, scale, steps, seed=i)
        out[name] = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out["cpu_s_per_image"] = torch.tensor((time.process_time() - cpu0) / sum(len(v) for v in out.values()))
    torch.save(out, path)
    return out


def score_run(folder: Path, reader, split: dict, rows: list[dict], ref: dict, scale: float, n_fd: int,
              per_prompt: int, steps: int = 20) -> dict:
    """Every score of the run in folder at one guidance scale (cached in folder/eval.json)."""
    cache_path = folder / "eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = f"{reader_id(reader)}|{n_fd}|{per_prompt}|dpmpp_2m|{steps}|{scale:g}"
    if key in cache:
        return cache[key]
    samples = generate(folder, split, rows, scale, n_fd, per_prompt, steps)
    r = {"scale": scale, "n": n_fd}
    for name, set_rows in prompt_sets(split, rows, n_fd, per_prompt).items():
        images = samples[name].float() / 127.5 - 1
        if name == "fd":
            r["fd"] = frechet(features(reader, images), ref["half_b"])
            r.update({f"fd_{k}": v for k, v in head_scores(reader, images, set_rows).items()})
        else:
            r.update({f"{name}_{k}": v for k, v in head_scores(reader, images, set_rows).items()})
            r[f"{name}_n"] = len(set_rows)
    r.update({"fd_halves": ref["fd_halves"], "fd_real_n": ref["fd_real_n"],
              "sample_cpu_s_per_image": float(samples["cpu_s_per_image"])})
    cache[key] = r
    cache_path.write_text(json.dumps(cache, indent=2) + "\n")
    return r
