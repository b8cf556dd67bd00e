"""The class-conditional route to confident digits in a few CPU-minutes: MNIST with labels, scored with CFG.

The issue's MNIST goal (>= 90 % of samples read as confident digits after 10 CPU-minutes of training)
measured on what `diffusekit train --data path/to/mnist` trains by default: a class-conditional model
(10 % label dropout), here with the recipe bench/quality_per_minute.py found for unconditional
models (batch 32, v-prediction, cosine schedule; bf16, channels_last), trained for a CPU budget in
this one-thread process. Scoring as bench/quality_per_minute.py (DDIM eta 0, 20 steps, n = 1,000,
the same judge, FD against t10k, confident = max softmax >= 0.9) with 100 images per class and
classifier-free guidance at each --guidance; also the share of samples the judge reads as the
class that was asked for.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_cfg_minutes.py --judge runs/judge --data path/to/mnist \\
        --budget-cpu-min 10 --guidance 1 2 3 --out runs/mnist_cfg
    OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_cfg_minutes.py --judge runs/judge --data path/to/mnist \
        --guidance 2 --run runs/mnist          # score a run trained elsewhere (the README's command)
    .venv/bin/python bench/mnist_cfg_minutes.py --plot docs/img/quality_per_minute_cfg.png \
        --out runs/mnist_cfg --qpm runs/quality_per_minute   # FD / confident share against CPU-minutes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_per_minute import MNIST28_WIDTHS, RECIPES, Judge, probe_cpu_s_per_step, score_images  # noqa: E402


def config(data: Path, recipe: str, steps: int, seed: int):
    """(RunConfig, dataset) of a class-conditional MNIST run with the recipe's options."""
    from diffusekit.training.resolve import resolve_run_config
    return resolve_run_config({"data.source": str(data), "data.split": "train", "train.precision": "bf16",
                               "train.channels_last": True, "train.sample_every": 0, "train.save_every": steps,
                               "train.log_every": 25, "train.seed": seed, "train.steps": steps,
                               "train.device": "cpu", **MNIST28_WIDTHS, **RECIPES[recipe]})


def sample_classes(pipe, n: int, steps: int, guidance: float, seed: int = 0, batch: int = 100):
    """n DDIM samples, class k for image k mod 10, each batch from a generator seeded by its first index."""
    from diffusekit.seeding import derive_seed
    out, labels = [], torch.arange(n) % 10
    for first in range(0, n, batch):
        g = torch.Generator().manual_seed(derive_seed(seed, "eval", first))
        b = min(batch, n - first)
        out.append(pipe.sample(b, sampler="ddim", num_steps=steps, generator=g, batch_size=b, progress=False,
                               class_labels=labels[first:first + b], guidance_scale=guidance).float().clamp(-1, 1))
    return torch.cat(out), labels


def _curve(points: list[tuple[float, float, float]]):
    """(minutes, fd, confident) points -> per budget: mean CPU-minutes, values (several seeds at a budget)."""
    by_budget: dict[float, list] = {}
    for budget, minutes, fd, conf in points:
        by_budget.setdefault(budget, []).append((minutes, fd, conf))
    return [(sum(p[0] for p in v) / len(v), [p[1] for p in v], [p[2] for p in v]) for _, v in sorted(by_budget.items())]


def plot(out: Path, qpm_dir: Path | None, path: Path, guidance: float = 2.0) -> None:
    """FD and confident share against training CPU-minutes: the class-conditional runs in `out` (guidance
    w) beside the unconditional curve of bench/quality_per_minute.py (ours and denoising-diffusion-pytorch)."""
    import re
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from quality_per_minute import minutes_axes
    series: dict[str, list] = {}
    for record_path in sorted(out.glob("*min-s*.json")):
        m = re.fullmatch(r"(.+)-([\d.]+)min-s(\d+)", record_path.stem)
        record = json.loads(record_path.read_text())
        if m and f"guidance {guidance:g}" in record and "cpu_s" in record.get("train", {}):
            g = record[f"guidance {guidance:g}"]
            label = f"class-conditional {'mnist28-lean' if m.group(1).endswith('-lean') else 'mnist28'}, CFG {guidance:g}"
            series.setdefault(label, []).append((float(m.group(2)), record["train"]["cpu_s"] / 60, g["fd"], g["confident"]))
    real = None
    if qpm_dir is not None:
        from quality_per_minute import load_results
        for name, r in load_results(qpm_dir).items():
            m = re.fullmatch(r"(ours-b32-v-cosine|lucidrains)-([\d.]+)min-s(\d+)", name)
            if m:
                label = "unconditional mnist28 (ours)" if m.group(1).startswith("ours") else \
                    "unconditional denoising-diffusion-pytorch"
                series.setdefault(label, []).append((float(m.group(2)), r["cpu_s"] / 60, r["eval"]["fd"],
                                                     r["eval"]["confident"]))
            elif name == "real":
                real = r["eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in series.items():
        curve = _curve(points)
        for ax, k in zip(axes, (1, 2)):
            xs = [c[0] for c in curve]
            ys = [sum(c[k]) / len(c[k]) for c in curve]
            line, = ax.plot(xs, ys, marker="o", label=label)
            for x, c in zip(xs, curve):
                if len(c[k]) > 1:         # the seeds' spread
                    ax.vlines(x, min(c[k]), max(c[k]), color=line.get_color())
    if real is not None:
        axes[0].axhline(real["fd"], color="gray", ls=":", label=f"1,000 real train images (FD {real['fd']:.3f})")
        axes[0].axhline(3 * real["fd"], color="gray", ls="--", lw=0.8, label="goal: 3x the real images' FD")
        axes[1].axhline(0.9, color="gray", ls="--", lw=0.8, label="goal: 0.9")
    minutes_axes(*axes)
    fig.suptitle("MNIST: quality per training CPU-minute (DDIM-20 samples; bars: the spread of 3 seeds)")
    fig.tight_layout()
    from diffusekit.viz import save_figure
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", type=Path, default=None, help="draw the curves of --out (and --qpm) to this PNG")
    ap.add_argument("--qpm", type=Path, default=None, help="bench/quality_per_minute.py's output folder")
    ap.add_argument("--judge", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--recipe", default="b32-v-cosine", choices=sorted(RECIPES))
    ap.add_argument("--budget-cpu-min", type=float, default=10.0)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/mnist_cfg")
    ap.add_argument("--run", type=Path, default=None,
                    help="score this run (trained elsewhere, e.g. by the README's command) instead of training one; "
                         "the scores go to RUN.json")
    args = ap.parse_args()
    if args.plot is not None:
        plot(args.out, args.qpm, args.plot)
        return
    if args.judge is None or args.data is None:
        ap.error("--judge and --data are required to train or score")
    torch.set_num_threads(1)
    from diffusekit.data import DataConfig, load_dataset
    from diffusekit.pipeline import Pipeline
    from diffusekit.training import train
    run = args.run or args.out / f"{args.recipe}-{args.budget_cpu_min:g}min-s{args.seed}"
    record_path = run.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if args.run is not None:
        record["train"] = {"run": str(args.run), "config": json.loads((args.run / "config.json").read_text())}
    if "train" not in record:
        images = load_dataset(DataConfig(source=str(args.data), split="train")).images
        per_step = probe_cpu_s_per_step(config(args.data, args.recipe, 1, args.seed)[0], images)
        steps = max(1, int(args.budget_cpu_min * 60 / per_step))
        c0, w0 = time.process_time(), time.time()
        cfg, dataset = config(args.data, args.recipe, steps, args.seed)
        result = train(cfg, run, progress=False, dataset=dataset)
        record["train"] = {"recipe": RECIPES[args.recipe], "probe_cpu_s_per_step": per_step, "steps": result.step,
                           "cpu_s": time.process_time() - c0, "wall_s": time.time() - w0,
                           "loadavg_end": os.getloadavg(), "final_loss": result.loss}
        record_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record["train"]), flush=True)
    pipe, judge = Pipeline.load(run, device="cpu", precision="bf16"), Judge(args.judge)
    for w in args.guidance:
        key = f"guidance {w:g}"
        if key in record:
            continue
        c0 = time.process_time()
        images, labels = sample_classes(pipe, args.n, args.steps, w, args.seed)
        r = score_images(images, judge, args.data, ROOT / "runs/bench_cache")
        logits = judge.features_and_logits(images)[1]
        r.update({"asked_class": float((logits.argmax(1) == labels).float().mean()),
                  "sample_eval_cpu_s": time.process_time() - c0})
        record[key] = r
        record_path.write_text(json.dumps(record, indent=1))
        print(key, json.dumps({k: r[k] for k in ("fd", "confident", "confident_0.99", "asked_class", "precision",
                                                 "recall")}), flush=True)


if __name__ == "__main__":
    main()
