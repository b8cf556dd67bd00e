"""Text-to-image on the real emoji set (../shared/data/emoji), measured per training CPU-minute at 32 px.

The split shared with bench/finetune.py (`emoji_split`) is defined first. Stages (each reuses what is finished):
  ae       KL autoencoders on the split's training rows (AUTOENCODERS: 32 px factor 4, 64 px factor 8)
  ladder   ONE latent run (MiniLM text, captions "{text}, {style} style", constant lr, EMA) snapshotted to
           OUT/latent-minilm/snapshots/MIN/ when its training CPU time passes each --marks minute
           (bench/emoji_t2i_train.py); more marks later resume the same run
  pixel, px64, learned   the same at 32 px in pixel space, at 64 px through the factor-8 autoencoder, and
           with the learned text encoder
  sample   samples of every snapshot (cached, uint8); score: the emoji reader's scores (bench/emoji_t2i_score.py)
  report   markdown table of the scores; grid: labelled grid of seen, held-out and rephrased prompts;
  frequency  the name top-5 per bin of the asked name's training images (score's cached samples)
  aegrid   held-out real images over their reconstructions by each of --autoencoders

    OMP_NUM_THREADS=1 .venv/bin/python bench/text_to_image_emoji.py ladder --data ../shared/data/emoji \
        --ae ae32-c8 --marks 1 5 15 30
Every training runs in this process under one thread; docs/BENCHMARKS.md, "Text-to-image on the emoji set".
"""
from __future__ import annotations

import json
import os
import random
import shutil
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


# ---------------------------------------------------------------------------------------------
# data: the split's training rows as an image folder (metadata.jsonl + links to the images)


def train_folder(data_dir, rows: list[dict], folder: Path) -> Path:
    """An image folder holding only `rows` of data_dir: its metadata.jsonl and the images (hard links where the
    file system allows, else copies; the data reader refuses symbolic links that lead outside the folder)."""
    data_dir, folder = Path(data_dir), Path(folder)
    meta = folder / "metadata.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if meta.exists() and meta.read_text() == text:
        return folder
    for r in rows:
        dest = folder / r["file_name"]
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(data_dir / r["file_name"], dest)
            except OSError:
                shutil.copyfile(data_dir / r["file_name"], dest)
    meta.write_text(text)
    return folder


# ---------------------------------------------------------------------------------------------
# the benchmark

# the autoencoders tried at 32 px (factor 4, 8x8 latents) and the one at 64 px (factor 8, 8x8 latents)
AUTOENCODERS = {
    "ae32-c4": (32, {}),                                           # the laptop default: 16-32-32, 4 channels
    "ae32-c8": (32, {"latent_channels": 8}),
    "ae32-w32c8": (32, {"base_channels": 32, "latent_channels": 8}),
    "ae32-c8-long": (32, {"latent_channels": 8}),                  # ae32-c8's layout, trained longer (--ae-steps 5000)
    "ae64-f8c8": (64, {"channel_mult": (1, 2, 2, 2), "latent_channels": 8}),
    "ae64-f8c8-long": (64, {"channel_mult": (1, 2, 2, 2), "latent_channels": 8}),   # trained longer (--ae-steps 2000)
    "ae64-f4c8": (64, {"latent_channels": 8}),                     # 64 px, factor 4: 16x16x8 latents
    # ae32-c8 with LDM's patch-GAN term (weight 0.5, adaptive) from step 500; run at the training CPU time of
    # ae32-c8 (a GAN step costs ~1.3x a plain one: --ae-steps 1630 against 2000)
    "ae32-c8-gan": (32, {"latent_channels": 8, "adversarial_weight": 0.5, "adversarial_start": 500}),
    "ae32-c8-gan01": (32, {"latent_channels": 8, "adversarial_weight": 0.1, "adversarial_start": 500}),
}
# the latent UNet at 8x8: tiny8's shape (attention at 4x4) with 64 base channels
LATENT_MODEL = {"model.base_channels": 64, "model.channel_mult": (1, 2, 2), "model.num_res_blocks": 1,
                "model.attention_resolutions": (4,), "model.num_heads": 4, "model.groups": 16}
# the pixel UNet at 32x32: one more level (32 -> 16 -> 8 -> 4), the same widths from 8x8 down
PIXEL_MODEL = {"model.base_channels": 32, "model.channel_mult": (1, 2, 4, 4), "model.num_res_blocks": 1,
               "model.attention_resolutions": (4,), "model.num_heads": 4, "model.groups": 16, "model.dropout": 0.0}
RECIPE = {"train.batch_size": 64, "train.lr": 1e-3, "train.warmup_steps": 200, "train.ema_decay": 0.999}


def run_options(source: Path, size: int, text: str, ae: Path | None, recipe: dict) -> dict:
    """Dotted options of a text-to-image run on the train folder at size px (latent when ae is given)."""
    opts = {"data.source": str(source), "data.image_size": size, "data.alpha_background": "white",
            "data.caption_template": TEMPLATE, "train.seed": 0, **recipe}
    opts.update({"text.kind": "learned"} if text == "learned" else {"text.kind": "pretrained", "text.path": "minilm"})
    if ae is not None:
        opts.update({"latent.autoencoder": str(ae), **LATENT_MODEL})
    else:
        opts.update(PIXEL_MODEL)
    return opts


def train_stage(args, out: Path, source: Path) -> dict:
    """The trainings args.stage names; every one reuses what is finished."""
    from emoji_t2i_train import autoencoder, ladder
    results = {}
    if args.stage == "ae":
        for name in args.autoencoders:
            size, ae = AUTOENCODERS[name]
            results[name] = autoencoder(out / name, str(source), size, args.ae_steps, 32, ae)
    elif args.stage in ("ladder", "learned"):
        name = args.name or ("latent-minilm" if args.stage == "ladder" else "latent-learned")
        text = "minilm" if args.stage == "ladder" else "learned"
        results[name] = ladder(out / name, run_options(source, 32, text, out / args.ae, RECIPE), args.marks)
    elif args.stage == "pixel":
        name = args.name or "pixel-minilm"
        results[name] = ladder(out / name, run_options(source, 32, "minilm", None, RECIPE), args.marks)
    elif args.stage == "px64":
        name = args.name or "latent64-minilm"
        results[name] = ladder(out / name, run_options(source, 64, "minilm", out / args.ae64, RECIPE), args.marks)
    return results


GRID_PROMPTS = [  # (prompt, kind): seen names, held-out combinations (filled from the split), rephrased names
    ("thumbs up sign, noto style", "seen"), ("red apple, twemoji style", "seen"),
    ("grinning face, twemoji style", "seen"), ("japan flag, noto style", "seen"),
    ("a thumbs up, dark skin", "rephrased"), ("an apple, red", "rephrased"), ("a smiling cat", "rephrased"),
    ("flag of japan", "rephrased")]


def grid_prompts(split: dict, rows: list[dict], k: int = 2) -> list[tuple[str, str]]:
    """The grid's prompts: GRID_PROMPTS with the first k held-out tone pairs and style pairs in between."""
    tone = [next(caption(r) for r in rows if (r["name"], r["skin_tone"]) == tuple(p)) for p in split["heldout_tone"][:k]]
    style = [next(caption(r) for r in rows if (r["name"], r["style"]) == tuple(p)) for p in split["heldout_style"][:k]]
    return [*GRID_PROMPTS[:4], *((t, "held-out tone") for t in tone), *((t, "held-out style") for t in style),
            *GRID_PROMPTS[4:]]


def save_grid(folder: Path, prompts: list[tuple[str, str]], scale: float, per_prompt: int, path: Path) -> None:
    """per_prompt samples (dpmpp_2m, 20 steps) of each prompt, one labelled row a prompt."""
    import torch
    from diffusekit.pipeline import Pipeline
    from diffusekit.viz import save_labelled_grid
    pipe = Pipeline.load(folder, device="cpu")
    text = [p for p, _ in prompts for _ in range(per_prompt)]
    images = pipe.sample(len(text), "dpmpp_2m", 20, generator=torch.Generator().manual_seed(2), prompt=text,
                         guidance_scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_labelled_grid(images, path, nrow=per_prompt, row_labels=[f"[{k}] {p}" for p, k in prompts])


def autoencoder_ceiling(ae_dir: Path, data_dir, reader, ref: dict, n: int) -> dict:
    """PSNR and reader FD of the autoencoder's reconstructions of n real images of half A (against half B)."""
    import torch
    from emoji_reader import features, frechet, load_emoji
    from emoji_t2i_score import HALF_SEED
    from diffusekit.store.autoencoder import load_trained_autoencoder
    from diffusekit.metrics import psnr
    from diffusekit.training.reconstruction import reconstruct
    from emoji_t2i_score import reader_id
    cache = ae_dir / f"ceiling-{reader_id(reader)}-{n}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, cfg = load_trained_autoencoder(ae_dir)
    images, _ = load_emoji(data_dir, size=cfg.data.image_size)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(HALF_SEED))
    real = images[perm[: len(perm) // 2][:n]]
    rec = reconstruct(model, real)
    out = {"psnr_db": float(psnr(rec, real)), "fd_reconstructions": frechet(features(reader, rec), ref["half_b"]),
           "n": n, "latent_channels": cfg.autoencoder.latent_channels, "size": cfg.data.image_size}
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


def autoencoder_grid(args, split: dict, rows: list[dict], k: int = 16) -> None:
    """k images no autoencoder trained on (a seeded choice of the rows the split holds out) over their
    reconstructions by each of args.autoencoders, one labelled row each, at args.grid_path."""
    import torch
    from emoji_reader import load_emoji
    from diffusekit.store.autoencoder import load_trained_autoencoder
    from diffusekit.training.reconstruction import reconstruct
    from diffusekit.viz import save_labelled_grid
    trained = {r["file_name"] for r in split["train_rows"]}
    unseen = [r for r in rows if r["file_name"] not in trained]
    pick = [unseen[i] for i in torch.randperm(len(unseen), generator=torch.Generator().manual_seed(3))[:k].tolist()]
    real, _ = load_emoji(args.data, size=32, rows=pick)
    images, labels = [real], ["real (not trained on)"]
    for name in args.autoencoders:
        model, cfg = load_trained_autoencoder(args.out / name)
        images.append(reconstruct(model, real))
        labels.append(f"{name} ({cfg.train.steps} steps)")
    save_labelled_grid(torch.cat(images), Path(args.grid_path), nrow=k, row_labels=labels)


def snapshot_folders(args) -> list[tuple[str, Path]]:
    """(RUN@MINUTES, folder) of every snapshot under args.out (only those args.runs names, if any)."""
    found = sorted(args.out.glob("*/snapshots/*"), key=lambda f: (f.parent.parent.name, float(f.name)))
    named = [(f"{f.parent.parent.name}@{f.name}", f) for f in found]
    return [(n, f) for n, f in named if not args.runs or any(r in n for r in args.runs)]


def sample_stage(args, split: dict, rows: list[dict]) -> None:
    """Only the samples of every snapshot (cached beside it), for scoring later by any reader."""
    from emoji_t2i_score import generate
    for name, folder in snapshot_folders(args):
        for scale in args.scales:
            generate(folder, split, rows, scale, args.n, args.per_prompt)
            print(f"{name} g{scale:g}: sampled", flush=True)


def score_stage(args, split: dict, rows: list[dict]) -> dict:
    """Reader scores of every snapshot (and run) under args.out, the autoencoders' ceilings, the grids."""
    from emoji_reader import load_reader
    from emoji_t2i_score import real_reference, real_rows_scores, score_run
    reader = load_reader(args.reader)
    ref = real_reference(args.data, reader, args.n, args.out / "reference")
    results = {"reference": {k: v for k, v in ref.items() if k != "half_b"}, "autoencoders": {}, "runs": {},
               "real_images": real_rows_scores(args.data, reader, split, rows, args.out / "reference")}
    print("real images of the prompt rows:", results["real_images"], flush=True)
    from text_to_image import _finished_autoencoder
    for name in AUTOENCODERS:
        if _finished_autoencoder(args.out / name):       # one still training has no latent scale yet
            results["autoencoders"][name] = autoencoder_ceiling(args.out / name, args.data, reader, ref, args.n)
            print(name, results["autoencoders"][name], flush=True)
    for name, folder in snapshot_folders(args):
        for scale in args.scales:
            r = score_run(folder, reader, split, rows, ref, scale, args.n, args.per_prompt)
            results["runs"].setdefault(name, []).append(r)
            print(f"{name} g{scale:g}: " + " ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)),
                  flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def frequency_report(args, split: dict, rows: list[dict]) -> str:
    """Markdown: the name top-5 per bin of the asked name's training images, of the real images and of every
    snapshot's samples (cached by score; sampled here where not): seen prompts, the FD set drawn like the
    data, the held-out style pairs."""
    from emoji_reader import load_emoji, load_reader, read
    from emoji_t2i_score import COUNT_LABELS, generate, name_top5_hits, prompt_sets, top5_by_count
    reader, train_rows = load_reader(args.reader), split["train_rows"]
    sets = prompt_sets(split, rows, args.n, args.per_prompt)

    def line(label: str, images, set_name: str) -> str:
        hits = name_top5_hits(reader, read(reader, images)["name"], sets[set_name])
        bins = top5_by_count(hits, sets[set_name], train_rows)
        cells = [f"{100 * v:.1f} % ({n})" if n else "-" for v, n in bins.values()]
        return f"| {label} | {set_name} | " + " | ".join(cells) + " |"
    lines = []
    for set_name in ("seen", "fd", "style"):
        real, _ = load_emoji(args.data, size=32, rows=sets[set_name])
        lines.append(line("real images", real, set_name))
        for name, folder in snapshot_folders(args):
            for scale in args.scales:
                samples = generate(folder, split, rows, scale, args.n, args.per_prompt)[set_name]
                lines.append(line(f"{name} g{scale:g}", samples.float() / 127.5 - 1, set_name))
    head = "| model | prompts | " + " | ".join(f"{b} training images" for b in COUNT_LABELS) + " |"
    return "\n".join([head, "|" + " --- |" * (2 + len(COUNT_LABELS)), *lines])


def report(args) -> str:
    """Markdown table of every scored snapshot under args.out (from the eval.json caches), one row per
    (run, CPU-minutes, guidance)), scored by the reader args.reader."""
    from emoji_reader import load_reader
    from emoji_t2i_score import reader_id
    rid = reader_id(load_reader(args.reader))
    head = ("| run @ training CPU-min | steps | guidance | FD (n) | FD / two halves | FD / real n | name top-1 / top-5 "
            "(seen) | category (seen) | held-out tone: tone | held-out style: style / name top-5 | sample CPU-s/img |")
    rows = [head, "|" + " --- |" * 11]
    for name, folder in snapshot_folders(args):
        cache = folder / "eval.json"
        if not cache.exists():
            continue
        step = _step(folder)
        scored = [r for k, r in json.loads(cache.read_text()).items() if k.startswith(rid)]
        for r in sorted(scored, key=lambda r: r["scale"]):
            rows.append(f"| {name} | {step} | {r['scale']:g} | {r['fd']:.2f} ({r['n']}) | {r['fd'] / r['fd_halves']:.1f}x | "
                        f"{r['fd'] / r['fd_real_n']:.1f}x | {100 * r['seen_name_top1']:.1f} / {100 * r['seen_name_top5']:.1f} % | "
                        f"{100 * r['seen_category_top1']:.1f} % | {100 * r['tone_tone_top1']:.1f} % | "
                        f"{100 * r['style_style_top1']:.1f} / {100 * r['style_name_top5']:.1f} % | "
                        f"{r['sample_cpu_s_per_image']:.3f} |")
    return "\n".join(rows)


def _step(folder: Path) -> int:
    from emoji_t2i_train import saved_step
    return saved_step(folder)


def main() -> None:
    import argparse
    import signal
    import sys
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["ae", "ladder", "pixel", "px64", "learned", "sample", "score", "grid", "aegrid",
                                          "report", "frequency"])
    ap.add_argument("--data", type=Path, required=True, help="the emoji folder (../shared/data/emoji)")
    ap.add_argument("--out", type=Path, default=Path("runs/t2i-emoji"))
    ap.add_argument("--autoencoders", nargs="+", default=["ae32-c4", "ae32-c8"], choices=sorted(AUTOENCODERS))
    ap.add_argument("--ae-steps", type=int, default=3000)
    ap.add_argument("--ae", default="ae32-c8", help="the autoencoder of the 32 px latent runs")
    ap.add_argument("--ae64", default="ae64-f8c8", help="the autoencoder of the 64 px latent run")
    ap.add_argument("--marks", type=float, nargs="+", default=[1, 5, 15, 30], help="CPU-minutes to snapshot at")
    ap.add_argument("--reader", type=Path, default=Path("runs/emoji-reader"), help="bench/emoji_reader.py folder")
    ap.add_argument("--n", type=int, default=1000, help="samples (and real images) per FD")
    ap.add_argument("--per-prompt", type=int, default=2, help="samples per seen / held-out prompt")
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0], help="guidance scales to score")
    ap.add_argument("--runs", nargs="*", default=[], help="score: only run@snapshot names containing one of these")
    ap.add_argument("--grid-run", default="latent-minilm/snapshots/30", help="grid: the run folder under --out")
    ap.add_argument("--grid-path", default="docs/img/emoji_t2i_grid.png")
    ap.add_argument("--set", nargs="*", default=[], help="recipe options, e.g. train.lr=5e-4")
    ap.add_argument("--name", default=None, help="ladder / learned / pixel / px64: the run's "
                    "folder under --out [latent-minilm / latent-learned / pixel-minilm / latent64-minilm]")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # a kill (SIGTERM) ends through SystemExit, so the time records of the interrupted training are written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    split = emoji_split(load_rows(args.data))
    source = train_folder(args.data, split["train_rows"], args.out / "data-train")
    if args.stage == "report":
        print(report(args))
        return
    if args.stage == "frequency":
        print(frequency_report(args, split, load_rows(args.data)))
        return
    if args.stage == "sample":
        sample_stage(args, split, load_rows(args.data))
        return
    if args.stage == "score":
        score_stage(args, split, load_rows(args.data))
        return
    if args.stage == "aegrid":
        autoencoder_grid(args, split, load_rows(args.data))
        return
    if args.stage == "grid":
        save_grid(args.out / args.grid_run, grid_prompts(split, load_rows(args.data)), args.scales[0], 6,
                  Path(args.grid_path))
        return
    from text_to_image import parse_sets
    RECIPE.update(parse_sets(args.set))
    results = train_stage(args, args.out, source)
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    main()
