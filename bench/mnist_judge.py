"""Is the MNIST judge saturated? FD of known-bad image sets, and of guided samples, against MNIST t10k, as
a ratio to what 1,000 real (train) images score, in several views of each judge.

The judge of bench/quality_per_minute.py and bench/mnist_cfg_minutes.py is a `diffusekit train-classifier`
MNIST classifier. Until 2026-12 its FD features were its penultimate layer: the bottleneck, GroupNorm +
SiLU, averaged over space (32 numbers). Trained to tell ten classes apart, such features keep little of
how a digit is drawn, so a set of typical, alike digits (what guidance gives) scored like real ones.
Judges are now trained with the "levels" view (diffusekit.nn.classifier). Views compared (same weights):

  judge         the judge's own features, what the benchmarks use ("pooled" or "levels" by its config)
  penultimate   the pooled bottleneck (C): the old judges' view
  grid+levels   the bottleneck on a 2x2 grid plus mean and std over space of every encoder level, unscaled
  levels        the new view: the pooled bottleneck plus each resolution level's last activations on a
                2x2 grid, each block divided by its RMS spread on the 5,000 training images
                `train-classifier` calibrates on (so it is the "levels" judge's own view, for any judge)

Bad sets (each n = 1,000 from MNIST train, against all 10,000 t10k images; real_other, another 1,000
random train images, shows the spread of the real images' own FD):
  one_class     digit 0 only;   blur   Gaussian blur, sigma 1 px;   copies   100 images, each 10 times
  typical       per class, 100 images drawn from the tenth of that class nearest its mean image (the
                diversity that guidance trades away for confidence)
plus any --samples NPZ (uint8 images, as `sample` below writes).

    diffusekit train-classifier --data ../shared/data/mnist --out runs/judge     # "levels" by default
    B="OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_judge.py"
    $B relevel --judge runs/judge-pooled --data ../shared/data/mnist --out runs/judge-relevelled  # an old judge
    $B sample --run runs/mnist --guidance 1 2 4 --out runs/guided      # 1,000 DDIM-20 samples per scale
    $B bad --judge runs/judge-pooled runs/judge --data ../shared/data/mnist \\
        --samples runs/guided/guidance1.npz runs/guided/guidance2.npz runs/guided/guidance4.npz
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emoji_reader import frechet, gaussian_blur  # noqa: E402

VIEWS = ("judge", "penultimate", "grid+levels", "levels")


@torch.no_grad()
def judge_views(model, images: torch.Tensor, scale: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """{view: (N, F) features} of images (N, 1, 28, 28) in [-1, 1] from one judge (see the module doc);
    scale: the "levels" view's block divisors."""
    from diffusekit.nn.embeddings import as_timestep_batch
    model.eval()
    out: dict[str, list] = {v: [] for v in VIEWS}
    for x in images.split(batch_size):
        temb = model.time_embed(as_timestep_batch(0.0, x.shape[0], x.device))
        h, skips = model.encoder(x, temb)
        a = F.silu(model.out_norm(h))
        grid = F.adaptive_avg_pool2d(a, 2).flatten(1)
        stats = torch.cat([torch.cat([s.mean((2, 3)), s.std((2, 3))], 1) for s in [*skips, h]], 1)
        out["judge"].append(model.features(x))
        out["penultimate"].append(a.mean((2, 3)))
        out["grid+levels"].append(torch.cat([grid, stats], 1))
        out["levels"].append(torch.cat([b / s for b, s in zip(model.feature_blocks(x), scale)], 1))
    return {v: torch.cat(f) for v, f in out.items()}


@torch.no_grad()
def levels_scale(model, train_images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The block divisors `train-classifier` calibrates a "levels" judge with (the same seeded draw of
    training images), for a judge of any view."""
    from diffusekit.seeding import derive_seed
    from diffusekit.training.classifier import CALIBRATION_IMAGES
    g = torch.Generator().manual_seed(derive_seed(seed, "feature-calibration"))
    idx = torch.randperm(len(train_images), generator=g)[:CALIBRATION_IMAGES]
    parts = [model.feature_blocks(b) for b in train_images[idx].split(500)]
    return torch.stack([torch.cat(p).var(0).mean().sqrt() for p in zip(*parts)])


def typical(images: torch.Tensor, labels: torch.Tensor, per_class: int, g: torch.Generator) -> torch.Tensor:
    """per_class images of each class drawn from the tenth of that class nearest the class's mean image."""
    picks = []
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        d = (images[idx] - images[idx].mean(0)).flatten(1).pow(2).sum(1)
        near = idx[d.argsort()[: max(1, len(idx) // 10)]]
        picks.append(near[torch.randint(len(near), (per_class,), generator=g)])
    return torch.cat(picks)


def bad_sets(images: torch.Tensor, labels: torch.Tensor, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    perm = torch.randperm(len(images), generator=g)
    real, other = perm[:n], perm[n:2 * n]
    zeros = (labels == 0).nonzero().flatten()
    few = real[: n // 10]
    one_class = zeros[torch.randperm(len(zeros), generator=g)[:n]]
    return {"real_train": images[real], "real_other": images[other], "one_class": images[one_class],
            "blur": gaussian_blur(images[real], 1.0), "copies": images[few.repeat(10)[:n]],
            "typical": images[typical(images, labels, n // 10, g)]}


def probe_sets(real: torch.Tensor, seed: int = 5) -> dict[str, torch.Tensor]:
    """Slight changes of the real set: Gaussian pixel noise (sigma 0.02 / 0.05 / 0.1 in [-1, 1]), the black
    background raised by 0.05 (6 of 255 grey levels), 16 grey levels. What does the view react to?"""
    g = torch.Generator().manual_seed(seed)
    sets = {f"noise_{s:g}": (real + s * torch.randn(real.shape, generator=g)).clamp(-1, 1) for s in (0.02, 0.05, 0.1)}
    sets["background_0.05"] = (real + 0.05 * (real < -0.99)).clamp(-1, 1)
    sets["grey_levels_16"] = ((real + 1) * 7.5).round() / 7.5 - 1
    return sets


def load_samples(path: Path) -> torch.Tensor:
    """(N, 1, 28, 28) images in [-1, 1] from an .npz holding uint8 `images` (N, 28, 28) or (N, 1, 28, 28)."""
    with np.load(path) as z:
        x = torch.from_numpy(z["images"]).float()
    return (x.view(len(x), 1, 28, 28) / 127.5 - 1.0)


def judge_check(judge_dir, data, n: int = 1000, seed: int = 0, samples: dict | None = None,
                known_bad: bool = True, probes: bool = False) -> dict:
    from diffusekit.data import DataConfig, load_dataset
    from diffusekit.store.classifier import load_classifier
    model, cfg = load_classifier(judge_dir)
    train = load_dataset(DataConfig(source=str(data), split="train"))
    test = load_dataset(DataConfig(source=str(data), split="t10k", class_labels=False))
    scale = levels_scale(model, train.images)
    g = torch.Generator().manual_seed(seed)
    ref = judge_views(model, test.images, scale)
    sets = {**bad_sets(train.images, train.labels, n, g), **(samples or {})}
    if not known_bad:
        sets = {k: v for k, v in sets.items() if k in ("real_train", "real_other") or k in (samples or {})}
    if probes:
        sets.update(probe_sets(sets["real_train"]))
    feats = {k: judge_views(model, x, scale) for k, x in sets.items()}
    fd = {v: {k: frechet(f[v], ref[v]) for k, f in feats.items()} for v in VIEWS}
    ratio = {v: {k: d / fd[v]["real_train"] for k, d in fd[v].items() if k != "real_train"} for v in VIEWS}
    result = {"judge": str(judge_dir), "judge_view": cfg.classifier.features, "n": n,
              "feature_dims": {v: ref[v].shape[1] for v in VIEWS}, "fd": fd, "ratio_to_real": ratio,
              "levels_scale": scale.tolist()}
    if cfg.classifier.features == "levels":      # the recomputed divisors are the judge's own
        result["levels_scale_max_rel_diff"] = float(((scale - model.feature_scale) / model.feature_scale).abs().max())
    return result


def sample_guided(run: Path, guidance: list[float], n: int, steps: int, out: Path, seed: int = 0) -> None:
    """n DDIM samples (100 per class for n = 1,000) of a class-conditional run at each guidance scale, as
    the benchmarks draw them (bench/mnist_cfg_minutes.py), to OUT/guidance{w}.npz (uint8)."""
    from diffusekit.pipeline import Pipeline
    from mnist_cfg_minutes import sample_classes
    pipe = Pipeline.load(run, device="cpu", precision="bf16")
    out.mkdir(parents=True, exist_ok=True)
    for w in guidance:
        images, labels = sample_classes(pipe, n, steps, w, seed)
        u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
        np.savez_compressed(out / f"guidance{w:g}.npz", images=u8, labels=labels.numpy())
        print(f"wrote {out / f'guidance{w:g}.npz'}", flush=True)


def relevel(judge_dir: Path, data: Path, out: Path) -> dict:
    """A "pooled" judge folder's network with the "levels" view, calibrated as `train-classifier` calibrates
    (training.classifier.calibrate: the same seeded 5,000 training images), written to OUT. The view changes
    nothing in training, so this is the judge `train-classifier --features levels` gives with the same
    options and seed, without training it again."""
    import dataclasses
    from diffusekit.data import DataConfig, load_dataset
    from diffusekit.nn.classifier import NoiseAwareClassifier
    from diffusekit.store.classifier import load_classifier, save_classifier
    from diffusekit.training.classifier import METRICS_FILE, calibrate
    old, cfg = load_classifier(judge_dir)
    cfg = dataclasses.replace(cfg, classifier=dataclasses.replace(cfg.classifier, features="levels"))
    model = NoiseAwareClassifier(cfg.classifier)
    model.load_state_dict({**old.state_dict(), "feature_scale": model.feature_scale})
    scale = calibrate(model.eval(), load_dataset(DataConfig(source=str(data), split="train")), cfg.train.seed)
    save_classifier(out, model, cfg)
    metrics_path = Path(judge_dir) / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update({"features": "levels", "num_features": model.num_features, "feature_scale": scale.tolist(),
                    "relevelled_from": str(judge_dir)})
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    bad = sub.add_parser("bad", help="the known-bad table (and --samples) for each --judge")
    bad.add_argument("--judge", type=Path, nargs="+", required=True, help="train-classifier folders (MNIST)")
    bad.add_argument("--data", type=Path, required=True, help="the MNIST IDX folder")
    bad.add_argument("--n", type=int, default=1000)
    bad.add_argument("--samples", type=Path, nargs="*", default=[], help=".npz files of sample sets to score too")
    bad.add_argument("--json", type=Path)
    bad.add_argument("--samples-only", action="store_true", help="score the real sets and --samples, no bad sets")
    bad.add_argument("--probes", action="store_true", help="also score slight changes of the real set (probe_sets)")
    smp = sub.add_parser("sample", help="guided samples of a class-conditional MNIST run")
    smp.add_argument("--run", type=Path, required=True)
    smp.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    smp.add_argument("--n", type=int, default=1000)
    smp.add_argument("--steps", type=int, default=20)
    smp.add_argument("--out", type=Path, required=True)
    rel = sub.add_parser("relevel", help="an old ('pooled') judge's network with the 'levels' view")
    rel.add_argument("--judge", type=Path, required=True)
    rel.add_argument("--data", type=Path, required=True, help="the MNIST IDX folder (its train split calibrates)")
    rel.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.cmd == "relevel":
        print(json.dumps(relevel(args.judge, args.data, args.out), indent=1))
        return
    if args.cmd == "sample":
        sample_guided(args.run, args.guidance, args.n, args.steps, args.out)
        return
    samples = {p.stem: load_samples(p) for p in args.samples}
    results = [judge_check(j, args.data, args.n, samples=samples, known_bad=not args.samples_only,
                           probes=args.probes)
               for j in args.judge]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
