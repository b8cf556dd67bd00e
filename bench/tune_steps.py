"""Tuned steps on the exact Gaussian mixtures: 5 tuned model calls against the best fixed spacings at 5 and 10.

The setting is bench/samplers.py's (its datasets, configurations, diffusers loops and metrics are
imported from it, not rewritten): linear schedule, T = 1000, epsilon prediction, the exact denoiser
of a 2-D (8 sharp components) and a 64-D (16 components) mixture, N samples per run scored by
sliced Wasserstein (SW) and, in 64-D, Frechet distance (FD) against an independent true sample;
medians over seeds.

Steps are tuned once per dataset and sampler (diffusekit.tune.tune_timesteps) on a tuning batch of
noise drawn apart from every evaluation seed, against a 100-step UniPC solution from that noise;
they are then scored like any other configuration on the evaluation seeds. Each tuned sampler is
compared with its own best built-in configuration at the same NFE, and with the best of all of
diffusekit's and all of diffusers' configurations at 5 and 10 calls.

Computing the fixed-spacing rows (every configuration of bench/samplers.py at each budget) is most
of the cost, and most of that is the sliced Wasserstein sort; --baseline reuses them from an
earlier run's JSON, so that trying other tuning settings costs minutes.

Usage:  .venv/bin/python bench/tune_steps.py [--n 2000] [--seeds 3] [--nfe 5 10] [--tune-batch 256]
            [--iterations 3] [--samplers unipc dpmpp_2m ...] [--jobs 2] [--json out.json] [--baseline out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

import diffusekit as dk
from diffusekit.samplers.base import SAMPLERS
from diffusekit.toy import ExactDenoiserModel, GaussianMixture
from diffusekit.tune import tune_timesteps

_spec = importlib.util.spec_from_file_location("bench_samplers", Path(__file__).with_name("samplers.py"))
sb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sb)

DETERMINISTIC = sorted(n for n, s in SAMPLERS.items() if not s.stochastic)
TUNE_SEED = 12345   # the tuning noise, apart from every evaluation seed


def setup(dataset, schedule_kind="linear"):
    """The schedule, mixture and exact model of bench/samplers.py's run_task."""
    dim, k, spread, std, data_seed = sb.DATASETS[dataset]
    schedule = dk.NoiseSchedule.create(schedule_kind, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    mixture = GaussianMixture.random(dim, k, torch.Generator().manual_seed(data_seed), spread=spread, std=std)
    return schedule, ExactDenoiserModel(mixture, schedule, "epsilon")


def tune_task(task):
    """Tuned timesteps for one (dataset, sampler, nfe), with the tuning time."""
    dataset, name, nfe, batch, iterations, threads = task
    torch.set_num_threads(threads)
    schedule, model = setup(dataset)
    x = torch.randn(batch, sb.DATASETS[dataset][0], generator=torch.Generator().manual_seed(TUNE_SEED))
    start = time.process_time()
    with torch.no_grad():
        ts = tune_timesteps(model, schedule, name, nfe, x, iterations=iterations)
    return (dataset, name, nfe), {"timesteps": ts.tolist(), "tune_cpu_s": time.process_time() - start,
                                  "model_calls": model.nfe}


def eval_task(task):
    """Every configuration at the budgets (unless baselines are given), and the tuned plans, for one (dataset, seed)."""
    dataset, seed, budgets, n, tuned, threads, with_baselines = task
    torch.set_num_threads(threads)
    schedule, model = setup(dataset)
    dim = sb.DATASETS[dataset][0]
    # the draws of bench/samplers.py's run_task, in its order: true sample, second true sample, noise
    g = torch.Generator().manual_seed(seed)
    ref = model.mixture.sample(n, generator=g).float()
    other = model.mixture.sample(n, generator=g).float()
    x_T = torch.randn(n, dim, generator=g, dtype=torch.float64).float()
    out = {("floor",): sb.metrics(other, ref, dataset, seed)}
    with torch.no_grad():
        for budget in (budgets if with_baselines else ()):
            for label, name, kw in sb.our_configs():
                x, nfe = sb.run_ours(name, kw, schedule, model, x_T, budget, seed)
                out[("ours", label, budget)] = {**sb.metrics(x, ref, dataset, seed), "nfe": nfe}
            for label, _, cls, kw in sb.diffusers_configs():
                x, nfe = sb.run_diffusers(cls, kw, "linear", model, x_T, budget, seed)
                out[("diffusers", label, budget)] = {**sb.metrics(x, ref, dataset, seed), "nfe": nfe}
        for (d, name, budget), info in tuned.items():
            if d != dataset:
                continue
            model.nfe = 0
            x = dk.get_sampler(name, schedule).sample(model, x_T.clone(), timesteps=info["timesteps"])
            out[("tuned", f"{name} tuned", budget)] = {**sb.metrics(x, ref, dataset, seed), "nfe": model.nfe}
    return dataset, out


def run(args):
    pool_map = map
    pool = None
    if args.jobs > 1:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        pool_map = pool.map
    try:
        tune_tasks = [(d, name, nfe, args.tune_batch, args.iterations, args.threads)
                      for d in sb.DATASETS for name in args.samplers for nfe in args.nfe]
        tuned = dict(pool_map(tune_task, tune_tasks))
        eval_tasks = [(d, seed, tuple(args.nfe), args.n, tuned, args.threads, args.baseline is None)
                      for d in sb.DATASETS for seed in range(args.seeds)]
        done = list(pool_map(eval_task, eval_tasks))
    finally:
        if pool is not None:
            pool.close()
    per_seed = {}
    for dataset, out in done:
        for key, m in out.items():
            per_seed.setdefault((dataset,) + key, []).append(m)
    results = {"floor": {}, "ours": {}, "diffusers": {}, "tuned": {}}
    for (dataset, lib, *rest), ms in per_seed.items():
        if lib == "floor":
            results["floor"][dataset] = sb.median_metrics(ms)
        else:
            label, budget = rest
            results[lib].setdefault(label, {}).setdefault(dataset, {})[budget] = sb.median_metrics(ms)
    if args.baseline is not None:
        results.update(load_baseline(args.baseline, args))
    return results, tuned


def load_baseline(path, args):
    """The ours / diffusers / floor rows of an earlier run with the same --n and --seeds: the JSON of
    bench/samplers.py --json or of this script (their draws and metrics are the same, so the numbers are too)."""
    with open(path) as f:
        data = json.load(f)
    earlier = data.get("args", {})
    for key in ("n", "seeds"):
        if key in earlier and earlier[key] != getattr(args, key):
            raise SystemExit(f"{path} was made with --{key} {earlier[key]}, this run has --{key} {getattr(args, key)}; "
                             "use the same value, or drop --baseline.")
    budgets = args.nfe
    data = data.get("results", data)
    out = {"floor": data["floor"], "ours": {}, "diffusers": {}}
    for lib in ("ours", "diffusers"):
        for label, per_dataset in data[lib].items():
            out[lib][label] = {d: {int(b): m for b, m in per_budget.items() if int(b) in budgets}
                               for d, per_budget in per_dataset.items()}
    return out


def _columns(budgets):
    return [(d, m, b) for d in sb.DATASETS for m in (["sw", "fd"] if sb.DATASETS[d][0] > 2 else ["sw"])
            for b in budgets]


def _best_row(results, lib, dataset, budget, metric, family=None):
    rows = {r: v for r, v in results[lib].items() if family is None or r.split()[0] == family}
    label = min(rows, key=lambda r: rows[r][dataset][budget][metric])
    return label, rows[label][dataset][budget]


def markdown_table(results, budgets, samplers):
    cols = _columns(budgets)
    head = ["configuration"] + [f"{d} {m.upper()} @{b}" for d, m, b in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(m, metric, b):
        v = f"{m[metric]:.4f}"
        return v + (f" ({m['nfe']:.0f})" if m["nfe"] != b else "")
    for name in samplers:
        row = results["tuned"][f"{name} tuned"]
        lines.append(f"| **{name} tuned** | " + " | ".join(cell(row[d][b], m, b) for d, m, b in cols) + " |")
        cells = []
        for d, m, b in cols:
            label, best = _best_row(results, "ours", d, b, m, family=name)
            cells.append(f"{cell(best, m, b)} {label.split(' ', 1)[1] if ' ' in label else ''}")
        lines.append(f"| {name}, best built-in | " + " | ".join(cells) + " |")
    for lib in ("ours", "diffusers"):
        cells = []
        for d, m, b in cols:
            label, best = _best_row(results, lib, d, b, m)
            cells.append(f"{cell(best, m, b)} {label}")
        lines.append(f"| {'diffusekit' if lib == 'ours' else 'diffusers'}, best of all | " + " | ".join(cells) + " |")
    lines.append("| noise floor | " + " | ".join(f"{results['floor'][d][m]:.4f}" for d, m, b in cols) + " |")
    return "\n".join(lines)


def summary(results, samplers, tuned_budget=5, against=10):
    """Per tuned sampler: its value at tuned_budget over diffusers' and diffusekit's best at `against`."""
    lines = []
    for d in sb.DATASETS:
        for metric in (["sw", "fd"] if sb.DATASETS[d][0] > 2 else ["sw"]):
            ld, bd = _best_row(results, "diffusers", d, against, metric)
            lo, bo = _best_row(results, "ours", d, against, metric)
            ratios = ", ".join(f"{name} {results['tuned'][f'{name} tuned'][d][tuned_budget][metric] / bd[metric]:.2f}"
                               for name in samplers)
            lines.append(f"{d} {metric.upper()} @{against}: diffusers' best {bd[metric]:.4f} ({ld}), diffusekit's best "
                         f"{bo[metric]:.4f} ({lo}), floor {results['floor'][d][metric]:.4f}; tuned @{tuned_budget} / "
                         f"diffusers' best: {ratios}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="samples per run (and in each true sample)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds; numbers are medians over seeds")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10], help="budgets (model calls)")
    p.add_argument("--tune-batch", type=int, default=256, help="noise samples the steps are tuned on")
    p.add_argument("--iterations", type=int, default=3, help="coordinate-descent sweeps")
    p.add_argument("--samplers", nargs="+", default=DETERMINISTIC, choices=DETERMINISTIC)
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--baseline", default=None, help="reuse the fixed-spacing rows of this JSON (from bench/samplers.py "
                   "--json or this script's --json, same --n and --seeds) instead of recomputing them")
    p.add_argument("--json", default=None, help="write all numbers and the tuned timesteps to this JSON file")
    args = p.parse_args()
    import diffusers
    start = time.time()
    results, tuned = run(args)
    print(f"# linear T=1000 epsilon; n={args.n} seeds={args.seeds} tune batch {args.tune_batch}, "
          f"{args.iterations} sweeps; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.jobs} processes x {args.threads} threads; "
          f"{time.time() - start:.0f} s wall")
    print(markdown_table(results, args.nfe, args.samplers))
    print()
    for (d, name, nfe), info in tuned.items():
        print(f"{d} {name} @{nfe}: t = {[round(t, 1) for t in info['timesteps']]}  "
              f"({info['model_calls']} model calls, {info['tune_cpu_s']:.1f} CPU s to tune)")
    print()
    if 5 in args.nfe and 10 in args.nfe:
        print(summary(results, args.samplers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "tuned": {" ".join(map(str, k)): v for k, v in tuned.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
