"""Is the MNIST judge saturated? FD of known-bad image sets against MNIST t10k, as a ratio to what
1,000 real (train) images score, in the judge's penultimate features and in richer views of it.

The judge of bench/quality_per_minute.py and bench/mnist_cfg_minutes.py is a `diffusekit
train-classifier` MNIST classifier whose features for FD are its penultimate layer: the bottleneck,
GroupNorm + SiLU, averaged over space (32 numbers for the default width). Trained to tell ten
classes apart, such features keep little of how a digit is drawn, so a set of typical, alike
digits (what guidance gives) scores like real ones. Views compared (same weights, no retraining):

  penultimate   what the benchmarks use: the activated bottleneck averaged over space (C)
  grid          the activated bottleneck averaged over a 2x2 grid instead of the whole image (4C)
  grid+levels   grid, plus the mean and standard deviation over space of every encoder level's
                activations (before the class decision saturates them)

Bad sets (each n = 1,000 from MNIST train, against all 10,000 t10k images):
  one_class     digit 0 only;   blur   Gaussian blur, sigma 1 px;   copies   100 images, each 10 times
  typical       per class, 100 images drawn from the tenth of that class nearest its mean image (the
                diversity that guidance trades away for confidence)

    OMP_NUM_THREADS=1 .venv/bin/diffusekit train-classifier --data ../shared/data/mnist --out runs/judge
    OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_judge.py --judge runs/judge --data ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emoji_reader import frechet, gaussian_blur  # noqa: E402

VIEWS = ("penultimate", "grid", "grid+levels")


@torch.no_grad()
def judge_views(model, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """{view: (N, F) features} of images (N, 1, 28, 28) in [-1, 1] from one judge (see the module doc)."""
    from diffusekit.nn.embeddings import as_timestep_batch
    model.eval()
    out: dict[str, list] = {v: [] for v in VIEWS}
    for x in images.split(batch_size):
        temb = model.time_embed(as_timestep_batch(0.0, x.shape[0], x.device))
        h, skips = model.encoder(x, temb)
        a = F.silu(model.out_norm(h))
        grid = F.adaptive_avg_pool2d(a, 2).flatten(1)
        levels = torch.cat([torch.cat([s.mean((2, 3)), s.std((2, 3))], 1) for s in [*skips, h]], 1)
        out["penultimate"].append(a.mean((2, 3)))
        out["grid"].append(grid)
        out["grid+levels"].append(torch.cat([grid, levels], 1))
    return {v: torch.cat(f) for v, f in out.items()}


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
    real = torch.randperm(len(images), generator=g)[:n]
    zeros = (labels == 0).nonzero().flatten()
    few = real[: n // 10]
    return {"real_train": images[real], "one_class": images[zeros[torch.randperm(len(zeros), generator=g)[:n]]],
            "blur": gaussian_blur(images[real], 1.0), "copies": images[few.repeat(10)[:n]],
            "typical": images[typical(images, labels, n // 10, g)]}


def judge_check(judge_dir, data, n: int = 1000, seed: int = 0) -> dict:
    from diffusekit.data import DataConfig, load_dataset
    from diffusekit.store.classifier import load_classifier
    model, _ = load_classifier(judge_dir)
    train = load_dataset(DataConfig(source=str(data), split="train"))
    test = load_dataset(DataConfig(source=str(data), split="t10k", class_labels=False))
    g = torch.Generator().manual_seed(seed)
    ref = judge_views(model, test.images)
    sets = {k: judge_views(model, x) for k, x in bad_sets(train.images, train.labels, n, g).items()}
    fd = {v: {k: frechet(s[v], ref[v]) for k, s in sets.items()} for v in VIEWS}
    ratio = {v: {k: d / fd[v]["real_train"] for k, d in fd[v].items() if k != "real_train"} for v in VIEWS}
    dims = {v: ref[v].shape[1] for v in VIEWS}
    return {"judge": str(judge_dir), "n": n, "feature_dims": dims, "fd": fd, "ratio_to_real": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", type=Path, nargs="+", required=True, help="train-classifier folders (MNIST)")
    ap.add_argument("--data", type=Path, required=True, help="the MNIST IDX folder")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = [judge_check(j, args.data, args.n) for j in args.judge]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
