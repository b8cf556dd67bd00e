"""Quality per CPU-minute on MNIST: a recipe search for diffusekit and FD against training CPU time.

Every job is one process on one thread; the budget is its CPU time (time.process_time), so other
jobs on a shared machine change the wall time, not the result. Jobs (each writes
OUT/results/NAME.json, so two can run at once):

  real                 the reference: 1,000 MNIST train images against t10k (FD floor at this n),
                       and the judge's confident share on real t10k and train images
  ours  --recipe R     diffusekit.training.train with recipe R (dotted RunConfig options, RECIPES below)
                       for --budget-cpu-min; steps = budget / CPU s per step measured on a probe of
                       the same network, loss, batch and precision, so the cosine schedule ends at
                       the budget; then scored
  peer                 lucidrains' Unet + GaussianDiffusion with their Trainer defaults (Adam 1e-4,
                       constant, EMA 0.995 every 10 steps, fp32; bench/vs_lucidrains.py::train_peer);
                       a constant lr, so EMA snapshots of one run at --snapshots CPU-minutes are the
                       models a shorter run would have given; each snapshot is scored
  rescore --grid-run N score run N of ours again (e.g. --steps 50)
  report / plot        tables of OUT/results; docs/img/quality_per_minute.png and a sample grid

Scoring (identical for all): diffusekit DDIM, eta 0, 20 steps (--steps) (trailing spacing), bf16 autocast,
n = 1,000 unconditional samples from the same starting noise; judge = a `diffusekit
train-classifier` MNIST classifier; FD / KID / precision / recall of its features (Judge) against
MNIST t10k (diffusekit.metrics); "confident" = judge max softmax probability >= 0.9.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_per_minute.py real --judge runs/judge --data path/to/mnist
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_per_minute.py ours --recipe defaults --budget-cpu-min 5 \\
        --judge runs/judge --data path/to/mnist
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_per_minute.py peer --budget-cpu-min 10 --snapshots 1 2 5 10 \\
        --judge runs/judge --data path/to/mnist
    .venv/bin/python bench/quality_per_minute.py report
    .venv/bin/python bench/quality_per_minute.py plot --img-dir docs/img
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_lucidrains import mnist_train, n_params, peer_pipeline, train_peer  # noqa: E402

CONFIDENT = 0.9          # judge max softmax probability that counts as "a confident digit"
STRICTER = (0.99, 0.999)  # also reported: the judge is confident on some noise images at 0.9

# the mnist28 preset's widths, pinned: the recipes below were measured on it, whatever the default
# preset for 28x28 images becomes (the -lean recipes override them)
MNIST28_WIDTHS = {"model.base_channels": 32, "model.channel_mult": [1, 2, 2]}

# dotted RunConfig options on top of the MNIST defaults (mnist28 widths, pinned above; unconditional,
# bf16, channels_last); "defaults" is what `diffusekit train --data path/to/mnist --preset mnist28` uses
RECIPES: dict[str, dict] = {
    "defaults": {},
    "b32": {"train.batch_size": 32},
    "lr4e-3": {"train.lr": 4e-3},
    "minsnr": {"train.loss_weighting": "min_snr", "train.min_snr_gamma": 5.0},
    "v-cosine": {"model.prediction_type": "v_prediction", "schedule.kind": "cosine"},
    "noattn": {"model.attention_resolutions": ()},
    "b32-lr4e-3": {"train.batch_size": 32, "train.lr": 4e-3},
    "b32-minsnr": {"train.batch_size": 32, "train.loss_weighting": "min_snr", "train.min_snr_gamma": 5.0},
    "b32-v": {"train.batch_size": 32, "model.prediction_type": "v_prediction"},
    "b32-v-cosine": {"train.batch_size": 32, "model.prediction_type": "v_prediction", "schedule.kind": "cosine"},
    # the same with the mnist28-lean network (widths 16/32/80: the same parameters, half the FLOPs)
    "b32-v-cosine-lean": {"train.batch_size": 32, "model.prediction_type": "v_prediction", "schedule.kind": "cosine",
                          "model.base_channels": 16, "model.channel_mult": [1, 2, 5]},
    "b16-v": {"train.batch_size": 16, "model.prediction_type": "v_prediction"},
    "b16-v-cosine": {"train.batch_size": 16, "model.prediction_type": "v_prediction", "schedule.kind": "cosine"},
    "b32-v-minsnr": {"train.batch_size": 32, "model.prediction_type": "v_prediction",
                     "train.loss_weighting": "min_snr", "train.min_snr_gamma": 5.0},
}


def base_options(data: Path, seed: int, budget_steps: int) -> dict:
    return {"data.source": str(data), "data.split": "train", "data.class_labels": False, **MNIST28_WIDTHS,
            "train.precision": "bf16", "train.channels_last": True, "train.sample_every": 0,
            "train.save_every": budget_steps, "train.log_every": 25, "train.seed": seed,
            "train.steps": budget_steps, "train.device": "cpu"}


def our_config(recipe: str, data: Path, seed: int, steps: int):
    from diffusekit.training.resolve import resolve_run_config
    return resolve_run_config({**base_options(data, seed, steps), **RECIPES[recipe]})


def probe_cpu_s_per_step(cfg, images: torch.Tensor, steps: int = 12) -> float:
    """CPU seconds per optimiser step of cfg's UNet, loss, batch and precision (after 3 warm-up steps)."""
    from diffusekit.training.ema import EMA
    from diffusekit.training.losses import diffusion_loss
    from diffusekit.nn.unet import UNet
    from diffusekit.schedule import NoiseSchedule
    tc, sc = cfg.train, cfg.schedule
    torch.manual_seed(0)  # benchmark entry point
    model = UNet(cfg.model).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    sched = NoiseSchedule.create(sc.kind, num_train_timesteps=sc.num_train_timesteps,
                                 beta_start=sc.beta_start, beta_end=sc.beta_end)
    g = torch.Generator().manual_seed(0)
    t0 = 0.0
    for i in range(steps + 3):
        if i == 3:
            t0 = time.process_time()
        x0 = images[torch.randint(0, len(images), (tc.batch_size,), generator=g)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion_loss(model, sched, x0.contiguous(memory_format=torch.channels_last),
                                  cfg.model.prediction_type, g, tc.loss_weighting, tc.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        ema.update(model)
    return (time.process_time() - t0) / steps


# ---------------------------------------------------------------------------------------------
# scoring


class Judge:
    """The judge classifier: its FD features (the view its config names: "levels" for judges trained since
    2026-12, the penultimate layer for older ones; see bench/mnist_judge.py) and max softmax probability."""

    def __init__(self, judge_dir: Path):
        from diffusekit.evaluation import feature_extractor
        self.extractor = feature_extractor(f"classifier:{judge_dir}")
        self.model = self.extractor.model.eval()

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, F), logits (N, classes)), float32 on the CPU, of images in [-1, 1]."""
        param = next(self.model.parameters())
        parts = [self.model.features_and_logits(b.to(param.device, param.dtype)) for b in images.split(batch)]
        return tuple(torch.cat([p[i] for p in parts]).float().cpu() for i in (0, 1))

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, F) float64, max softmax probability (N,)) of images in [-1, 1]."""
        feats, logits = self.features_and_logits(images)
        return feats.double().numpy(), torch.softmax(logits, dim=1).max(1).values.numpy()


def score_images(images: torch.Tensor, judge: Judge, data: Path, cache: Path, seed: int = 0) -> dict:
    """FD / KID / precision / recall against MNIST t10k and the confident share of images in [-1, 1]."""
    from diffusekit import metrics as M
    from diffusekit.data import DataConfig
    from diffusekit.evaluation import reference_statistics
    feats, conf = judge(images)
    ref = DataConfig(source=str(data), split="t10k", class_labels=False)
    ref_stats = reference_statistics(ref, judge.extractor, cache)
    r = M.evaluate(feats, ref_stats, seed=seed)
    r.update({"confident": float((conf >= CONFIDENT).mean()), "confident_threshold": CONFIDENT,
              **{f"confident_{t:g}": float((conf >= t).mean()) for t in STRICTER},
              "mean_max_prob": float(conf.mean()), "n": len(images)})
    return r


def sample(pipe, n: int, steps: int, seed: int = 0, batch: int = 100) -> torch.Tensor:
    """n DDIM samples (eta 0), batch k from a generator seeded by (seed, "eval", first index)."""
    from diffusekit.seeding import derive_seed
    out = []
    for first in range(0, n, batch):
        g = torch.Generator().manual_seed(derive_seed(seed, "eval", first))
        b = min(batch, n - first)
        out.append(pipe.sample(b, sampler="ddim", num_steps=steps, generator=g, batch_size=b,
                               progress=False).float().clamp(-1, 1))
    return torch.cat(out)


def score_pipe(pipe, args, out_npz: Path) -> dict:
    c0 = time.process_time()
    images = sample(pipe, args.n, args.steps)
    sample_cpu = time.process_time() - c0
    out_npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_npz, images=((images[:100] + 1) * 127.5).round().to(torch.uint8).numpy())
    r = score_images(images, Judge(args.judge), args.data, ROOT / "runs/bench_cache")
    r.update({"sampler": "ddim", "sampler_steps": args.steps, "sample_cpu_s": sample_cpu,
              "eval_cpu_s": time.process_time() - c0})
    return r


# ---------------------------------------------------------------------------------------------
# jobs


def meta(args) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg(),
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}


def save(args, name: str, record: dict) -> None:
    path = args.out / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"{name}: {json.dumps({k: record['eval'][k] for k in ('fd', 'confident', 'precision', 'recall')})}",
          flush=True)


def job_real(args) -> None:
    from diffusekit.data import DataConfig, load_dataset
    m = meta(args)
    judge = Judge(args.judge)
    train = mnist_train(args.data)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.n]
    r = score_images(train[idx], judge, args.data, ROOT / "runs/bench_cache")
    test = load_dataset(DataConfig(source=str(args.data), split="t10k", class_labels=False)).images
    _, conf = judge(test)
    r["t10k_confident"] = float((conf >= CONFIDENT).mean())
    r.update({f"t10k_confident_{t:g}": float((conf >= t).mean()) for t in STRICTER})
    # the same test on pure noise: N(0, 1) images clamped to [-1, 1] (what an untrained model gives)
    noise = torch.randn(args.n, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    _, conf = judge(noise)
    r.update({f"noise_confident_{t:g}": float((conf >= t).mean()) for t in (CONFIDENT, *STRICTER)})
    r["t10k_mean_max_prob"] = float(conf.mean())
    save(args, "real", {**m, "kind": "real", "eval": r})


def job_ours(args) -> None:
    from diffusekit.pipeline import Pipeline
    from diffusekit.training import train
    m = meta(args)
    budget = args.budget_cpu_min * 60
    name = f"ours-{args.recipe}-{args.budget_cpu_min:g}min-s{args.seed}"
    cfg, dataset = our_config(args.recipe, args.data, args.seed, 10)
    per_step = probe_cpu_s_per_step(cfg, dataset.images)
    steps = max(1, int(budget / per_step))
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, save_every=steps))
    print(f"{name}: {per_step:.3f} CPU s/step -> {steps} steps", flush=True)
    run_dir = args.out / "runs" / name
    c0, w0 = time.process_time(), time.time()
    result = train(cfg, run_dir, progress=False, dataset=dataset)
    record = {"name": name, "kind": "ours", "recipe": args.recipe, "options": RECIPES[args.recipe],
              "seed": args.seed, "budget_cpu_min": args.budget_cpu_min, "probe_cpu_s_per_step": per_step,
              "steps": result.step, "batch_size": cfg.train.batch_size, "cpu_s": time.process_time() - c0,
              "wall_s": time.time() - w0, "final_loss": result.loss, "params": n_params(result.model),
              "loadavg_end_train": os.getloadavg()}
    print(f"{name}: trained {record}", flush=True)
    pipe = Pipeline.load(run_dir, device="cpu", precision="bf16")
    record["eval"] = score_pipe(pipe, args, args.out / "results" / f"{name}.npz")
    save(args, name, {**m, **record})


def job_peer(args) -> None:
    m = meta(args)
    images = mnist_train(args.data)
    budget = args.budget_cpu_min * 60
    snaps: list[tuple[float, int, dict]] = []
    marks = [s * 60 for s in args.snapshots] if args.snapshots else [budget]

    def keep(cpu_s, step, ema_unet):
        snaps.append((cpu_s, step, {k: v.detach().clone() for k, v in ema_unet.state_dict().items()}))

    w0 = time.time()
    record, unet = train_peer("lucidrains", budget, 64, images, "theirs", seed=args.seed,
                              snapshot_s=marks, on_snapshot=keep)
    record.update({"wall_s_train": time.time() - w0, "loadavg_end_train": os.getloadavg()})
    print(f"lucidrains: trained {record}", flush=True)
    for (cpu_s, step, state), mark in zip(snaps, marks):
        name = f"lucidrains-{mark / 60:g}min-s{args.seed}"
        unet.load_state_dict(state)
        r = {"name": name, "kind": "lucidrains", "seed": args.seed, "budget_cpu_min": mark / 60,
             "steps": step, "batch_size": 64, "cpu_s": cpu_s, "params": record["params"],
             "full_run": record, "eval": score_pipe(peer_pipeline(unet.eval()), args,
                                                    args.out / "results" / f"{name}.npz")}
        save(args, name, {**m, **r})


def job_rescore(args) -> None:
    """Score an existing run of ours again (e.g. with --steps 50) into results/rescore/NAME-ddimSTEPS.json."""
    from diffusekit.pipeline import Pipeline
    m = meta(args)
    pipe = Pipeline.load(args.out / "runs" / args.grid_run, device="cpu", precision="bf16")
    name = f"{args.grid_run}-ddim{args.steps}"
    r = score_pipe(pipe, args, args.out / "results" / "rescore" / f"{name}.npz")
    path = args.out / "results" / "rescore" / f"{name}.json"
    path.write_text(json.dumps({**m, "name": name, "kind": "rescore", "eval": r}, indent=1, default=float))
    print(f"{name}: fd {r['fd']:.3f} confident {r['confident']:.3f}", flush=True)


# ---------------------------------------------------------------------------------------------
# report


def load_results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}


def noise_like(npz: Path) -> str:
    """How many of the saved (first 100) samples look like noise: > 40% of pixels brighter than 0.25
    (real t10k digits: at most 35%, mean 16%)."""
    if not npz.exists():
        return "-"
    x = np.load(npz)["images"][:, 0].astype(np.float64) / 255
    return str(int(((x > 0.25).mean(axis=(1, 2)) > 0.4).sum()))


def report(out: Path) -> str:
    res = load_results(out)
    rows = ["| run | params | steps x batch | train CPU min | train wall min | load avg | loss | FD | "
            "confident >= 0.9 / 0.99 | KID | precision | recall | noise-like / 100 |", "|" + " --- |" * 13]
    for name, r in res.items():
        e = r["eval"]
        if r["kind"] == "real":
            rows.append(f"| real: {e['n']} train images | - | - | - | - | - | - | {e['fd']:.3f} | "
                        f"{e['confident']:.3f} / {e['confident_0.99']:.3f} (t10k {e['t10k_confident']:.3f} / "
                        f"{e['t10k_confident_0.99']:.3f}) | {e['kid_mean']:.4f} | "
                        f"{e['precision']:.3f} | {e['recall']:.3f} | - |")
            continue
        wall = r.get("wall_s", r.get("full_run", {}).get("wall_s_train", float("nan")) * r["cpu_s"]
                     / max(1e-9, r.get("full_run", {}).get("cpu_s", float("nan"))))
        load = f"{r['loadavg_start'][0]:.1f}-{r.get('loadavg_end_train', r.get('full_run', {}).get('loadavg_end_train', [float('nan')]))[0]:.1f}"
        loss = f"{r['final_loss']:.4f}" if "final_loss" in r else "-"   # snapshots: the loop logs no loss
        rows.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['steps']} x {r['batch_size']} | "
                    f"{r['cpu_s'] / 60:.2f} | {wall / 60:.1f} | {load} | {loss} | {e['fd']:.2f} | "
                    f"{e['confident']:.3f} / {e['confident_0.99']:.3f} | {e['kid_mean']:.4f} | {e['precision']:.3f} | {e['recall']:.3f} | "
                    f"{noise_like(out / 'results' / (name + '.npz'))} |")
    return "\n".join(rows)


def _series(res: dict, recipe: str) -> dict[str, list]:
    series = {f"diffusekit ({recipe})": [r for r in res.values() if r.get("recipe") == recipe]}
    if recipe != "defaults":
        series["diffusekit (old defaults)"] = [r for r in res.values() if r.get("recipe") == "defaults"]
    series["denoising-diffusion-pytorch (Trainer defaults)"] = [r for r in res.values() if r["kind"] == "lucidrains"]
    return series


def _plot_metric(ax, series: dict, key: str) -> None:
    """One line per series through the seed-0 runs; min-max bars and dots where a budget has several seeds."""
    for (label, runs), marker in zip(series.items(), "osD"):
        if not runs:
            continue
        by_budget: dict[float, list] = {}
        for r in runs:
            by_budget.setdefault(r["budget_cpu_min"], []).append(r)
        xs = sorted(by_budget)
        seed0 = [next((r for r in by_budget[x] if r["seed"] == 0), by_budget[x][0]) for x in xs]
        line = ax.plot([r["cpu_s"] / 60 for r in seed0], [r["eval"][key] for r in seed0], marker=marker,
                       label=label)[0]
        for x in xs:
            if len(by_budget[x]) > 1:
                vals = [r["eval"][key] for r in by_budget[x]]
                cpu = [r["cpu_s"] / 60 for r in by_budget[x]]
                mid = float(np.mean(vals))
                ax.errorbar([np.mean(cpu)], [mid], yerr=[[mid - min(vals)], [max(vals) - mid]],
                            color=line.get_color(), capsize=4, fmt="none")
                ax.scatter(cpu, vals, color=line.get_color(), s=10, alpha=0.6)


def minutes_axes(ax_fd, ax_confident) -> None:
    """The two panels of a quality-per-CPU-minute figure: log CPU-minutes 1-20, log FD, confident share."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    for a in (ax_fd, ax_confident):
        a.set_xscale("log")
        a.set_xticks([1, 2, 5, 10, 20])
        a.xaxis.set_major_formatter(ScalarFormatter())
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlabel("training CPU-minutes (1 thread)")
        a.legend(fontsize=7)
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("judge-feature FD vs MNIST t10k (n = 1,000)")
    ax_confident.set_ylabel(f"share of samples with judge max prob >= {CONFIDENT}")
    ax_confident.set_ylim(0, 1.02)


def plot(out: Path, img_dir: Path, recipe: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = load_results(out)
    series = _series(res, recipe)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    _plot_metric(ax, series, "fd")
    _plot_metric(ax2, series, "confident")
    if "real" in res:
        e = res["real"]["eval"]
        ax.axhline(e["fd"], color="gray", ls=":", label=f"1,000 real train images (FD {e['fd']:.3f})")
        ax.axhline(3 * e["fd"], color="gray", ls="--", lw=0.8, label="goal: 3x the real images' FD")
        ax2.axhline(e["t10k_confident"], color="gray", ls=":", label=f"real t10k images ({e['t10k_confident']:.3f})")
        ax2.axhline(0.9, color="gray", ls="--", lw=0.8, label="goal: 0.9")
        if "noise_confident_0.9" in e:
            ax2.axhline(e["noise_confident_0.9"], color="red", ls=":", lw=0.8,
                        label=f"pure noise images ({e['noise_confident_0.9']:.2f})")
    minutes_axes(ax, ax2)
    fig.suptitle("MNIST, unconditional: quality per training CPU-minute (DDIM-20 samples)")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(img_dir / "quality_per_minute.png", dpi=110)


def grid(out: Path, name: str, path: Path) -> None:
    from PIL import Image
    imgs = np.load(out / "results" / f"{name}.npz")["images"][:100, 0]
    tiles = imgs.reshape(10, 10, 28, 28).transpose(0, 2, 1, 3).reshape(280, 280)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tiles).resize((560, 560), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["real", "ours", "peer", "rescore", "report", "plot", "grid"])
    parser.add_argument("--judge", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--recipe", default="defaults", choices=sorted(RECIPES))
    parser.add_argument("--budget-cpu-min", type=float, default=5.0)
    parser.add_argument("--snapshots", type=float, nargs="*", default=[], help="peer: CPU-minutes to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (eta 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/quality_per_minute")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    parser.add_argument("--grid-name", help="grid: file name under --img-dir")
    parser.add_argument("--grid-run", help="grid / rescore: the result (run) name")
    args = parser.parse_args()
    if args.job == "report":
        print(report(args.out))
        return
    if args.job == "plot":
        plot(args.out, args.img_dir, args.recipe)
        return
    if args.job == "grid":
        grid(args.out, args.grid_run, args.img_dir / (args.grid_name or "mnist_10min_samples.png"))
        return
    if args.judge is None or args.data is None:
        parser.error("--judge and --data are required for real / ours / peer")
    torch.set_num_threads(1)
    {"real": job_real, "ours": job_ours, "peer": job_peer, "rescore": job_rescore}[args.job](args)


if __name__ == "__main__":
    main()
