"""Sampler accuracy versus model evaluations: diffusekit's samplers against diffusers' scheduler loops.

The model is the exact denoiser of a known Gaussian mixture (diffusekit.toy), so every bit of
distance between the samples and the true distribution is the sampler's own error (plus the
finite-sample noise floor, which is reported). Two mixtures: 2-D (8 sharp components) and 64-D
(16 components). For each NFE budget (5, 10, 20, 50) every sampler runs with as many steps as fit
the budget; the NFE reported is the one the model's .nfe counter saw (Heun: 2 n - 1).

Metrics: sliced 1-Wasserstein distance (SW) to an independent true sample of the same size, with
many fixed random projections; for 64-D also the Frechet distance (FD) of fitted Gaussians. All
deterministic samplers of one seed start from the same noise; stochastic ones also share their
generator seed. Each number is the median over --seeds seeds. The noise floor is the same metric
between two independent true samples of the same size.

diffusers is driven as in its pipelines: set_timesteps, then scale_model_input and step per
timestep; Euler/Heun's initial noise is scaled into sigma space by sqrt(1 + sigma_0^2), exactly
as ours. beta_start/beta_end are passed explicitly (Heun's defaults differ); clip_sample=False for
DDIM/DDPM (their default True would clamp x0 to [-1, 1], wrong for these data).

Usage:  .venv/bin/python bench/samplers.py [--n 2000] [--seeds 3] [--schedule linear] [--jobs 2]
            [--json out.json] [--plot docs/img/samplers_nfe.png]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import numpy as np
import torch

import diffusekit as dk
from diffusekit.metrics import feature_stats, frechet_distance
from diffusekit.samplers.base import SAMPLER_SPACINGS, SAMPLERS, TIMESTEP_SPACINGS
from diffusekit.toy import ExactDenoiserModel, GaussianMixture, sliced_wasserstein

NFE_BUDGETS = (5, 10, 20, 50)
# name -> (dim, components, spread, std, seed): small std makes the 2-D mixture sharp (hard)
DATASETS = {"2-D": (2, 8, 1.0, 0.1, 0), "64-D": (64, 16, 3.0, 0.2, 1)}
PROJECTIONS = {"2-D": 256, "64-D": 1024}
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# --- configurations ---------------------------------------------------------------------------

def our_configs():
    """(label, name, kwargs): every registered sampler x spacing x Karras on/off."""
    out = []
    for name, spec in SAMPLERS.items():
        # stochastic samplers are far from the truth at these budgets: their default spacing only
        for spacing in (("trailing",) if spec.stochastic else SAMPLER_SPACINGS):
            out.append((f"{name} {spacing}", name, {"timestep_spacing": spacing}))
        if spec.karras and not spec.stochastic:
            # solver-style Karras sigmas span the whole schedule whatever the spacing: one row
            for spacing in (TIMESTEP_SPACINGS if spec.style == "karras" else ("trailing",)):
                label = f"{name} {spacing} karras" if spec.style == "karras" else f"{name} karras"
                out.append((label, name, {"timestep_spacing": spacing, "use_karras_sigmas": True}))
    return out


def diffusers_configs():
    """(label, family, scheduler class name, kwargs): each scheduler at each spacing (its default
    marked), Karras on/off, and its options equivalent to ours (exponential sigmas / Lu lambdas are
    uniform in log-SNR) or beyond them (solver_order=3), so that "diffusers' best" is not only what
    we mirror."""
    families = {  # family: (class, base kwargs, default spacing, karras allowed, extra option sets)
        "ddim": ("DDIMScheduler", {"clip_sample": False}, "leading", False, []),
        "ddpm": ("DDPMScheduler", {"clip_sample": False}, "leading", False, []),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "linspace", True,
                     [{"use_lu_lambdas": True}, {"use_exponential_sigmas": True}, {"solver_order": 3},
                      {"solver_order": 3, "use_lu_lambdas": True}]),
        "euler": ("EulerDiscreteScheduler", {}, "linspace", True, [{"use_exponential_sigmas": True}]),
        "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "linspace", False, []),
        "heun": ("HeunDiscreteScheduler", {}, "linspace", True, [{"use_exponential_sigmas": True}]),
        "unipc": ("UniPCMultistepScheduler", {}, "linspace", True,
                  [{"use_exponential_sigmas": True}, {"solver_order": 3},
                   {"solver_order": 3, "use_exponential_sigmas": True}]),
    }
    out = []
    for family, (cls, base, default, karras, extras) in families.items():
        stochastic = family in ("ddpm", "euler_ancestral")
        for spacing in ((default,) if stochastic else TIMESTEP_SPACINGS):
            mark = " (default)" if spacing == default else ""
            out.append((f"{family} {spacing}{mark}", family, cls, {**base, "timestep_spacing": spacing}))
        if karras:
            # DPM-Solver/UniPC Karras sigmas ignore the spacing; Euler/Heun's depend on it
            for spacing in (TIMESTEP_SPACINGS if family in ("euler", "heun") else (default,)):
                label = f"{family} {spacing} karras" if family in ("euler", "heun") else f"{family} karras"
                out.append((label, family, cls, {**base, "timestep_spacing": spacing, "use_karras_sigmas": True}))
        for extra in extras:
            label = " ".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in extra.items())
            out.append((f"{family} {label}", family, cls, {**base, **extra}))
    return out


# --- running one sampler ----------------------------------------------------------------------

def steps_for_budget(nfe_of, budget):
    """The largest step count whose NFE fits the budget (Heun: n with 2 n - 1 <= budget)."""
    n = budget
    while n > 1 and nfe_of(n) > budget:
        n -= 1
    return n


def run_ours(name, kw, schedule, model, x_T, budget, seed):
    sampler = dk.get_sampler(name, schedule, prediction_type="epsilon", **kw)
    n = steps_for_budget(sampler.nfe, budget)
    model.nfe = 0
    x = sampler.sample(model, x_T.clone(), num_steps=n, generator=torch.Generator().manual_seed(seed))
    return x, model.nfe


def run_diffusers(cls_name, kw, schedule_kind, model, x_T, budget, seed):
    import diffusers
    cls = getattr(diffusers, cls_name)
    sched = cls(beta_schedule=DIFFUSERS_SCHEDULE[schedule_kind], beta_start=1e-4, beta_end=0.02,
                prediction_type="epsilon", num_train_timesteps=1000, **kw)
    is_heun = cls_name == "HeunDiscreteScheduler"
    n = steps_for_budget(lambda k: 2 * k - 1 if is_heun else k, budget)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    sigmas = getattr(sched, "sigmas", None)
    if cls_name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        # N(0, I) is x_T in the VP convention; sigma space is x / sqrt(abar) = x * sqrt(1 + sigma_0^2)
        x = x * math.sqrt(1 + float(sigmas[0]) ** 2)
    model.nfe = 0
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        out = model(x_in, t.reshape(1).expand(len(x)).double())
        extra = {"generator": g} if cls_name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler") else {}
        x = sched.step(out, t, x, **extra).prev_sample
    return x, model.nfe


# --- metrics ----------------------------------------------------------------------------------

def metrics(x, ref, dataset, seed):
    """SW (fixed projections per dataset and seed) and, for d > 2, FD of fitted Gaussians."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {"sw": sliced_wasserstein(x, ref, PROJECTIONS[dataset], generator=g)}
    if x.shape[1] > 2:
        out["fd"] = frechet_distance(*feature_stats(x.double().numpy()), *feature_stats(ref.double().numpy()))
    return out


def median_metrics(per_seed):
    return {k: statistics.median(m[k] for m in per_seed) for k in per_seed[0]}


def run_task(task):
    """All configurations and budgets for one (dataset, seed): {key: metrics}."""
    dataset, seed, budgets, n, schedule_kind, threads = task
    torch.set_num_threads(threads)
    dim, k, spread, std, data_seed = DATASETS[dataset]
    schedule = dk.NoiseSchedule.create(schedule_kind, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    mixture = GaussianMixture.random(dim, k, torch.Generator().manual_seed(data_seed), spread=spread, std=std)
    model = ExactDenoiserModel(mixture, schedule, "epsilon")
    g = torch.Generator().manual_seed(seed)
    ref = mixture.sample(n, generator=g).float()
    other = mixture.sample(n, generator=g).float()
    x_T = torch.randn(n, dim, generator=g, dtype=torch.float64).float()
    out = {("floor",): metrics(other, ref, dataset, seed)} if budgets[0] == NFE_BUDGETS[0] else {}
    with torch.no_grad():
        for budget in budgets:
            for label, name, kw in our_configs():
                x, nfe = run_ours(name, kw, schedule, model, x_T, budget, seed)
                out[("ours", label, budget)] = {**metrics(x, ref, dataset, seed), "nfe": nfe}
            for label, _, cls, kw in diffusers_configs():
                x, nfe = run_diffusers(cls, kw, schedule_kind, model, x_T, budget, seed)
                out[("diffusers", label, budget)] = {**metrics(x, ref, dataset, seed), "nfe": nfe}
    return dataset, out


def run(args):
    # NFE 50 costs as much as 5, 10 and 20 together: two tasks per (dataset, seed) balance the workers
    tasks = [(d, seed, budgets, args.n, args.schedule, args.threads)
             for d in DATASETS for seed in range(args.seeds) for budgets in ((50,), (5, 10, 20))]
    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(run_task, tasks)
    else:
        done = [run_task(t) for t in tasks]
    per_seed = {}
    for dataset, out in done:
        for key, m in out.items():
            per_seed.setdefault((dataset,) + key, []).append(m)
    results = {"floor": {}, "ours": {}, "diffusers": {}}
    for (dataset, lib, *rest), ms in per_seed.items():
        if lib == "floor":
            results["floor"][dataset] = median_metrics(ms)
        else:
            label, budget = rest
            results[lib].setdefault(label, {}).setdefault(dataset, {})[budget] = median_metrics(ms)
    return results


# --- reporting --------------------------------------------------------------------------------

def best(results, lib, dataset, budget, metric="sw"):
    """(label, value) of the library's best configuration at a budget."""
    rows = results[lib]
    label = min(rows, key=lambda r: rows[r][dataset][budget][metric])
    return label, rows[label][dataset][budget][metric]


def markdown_table(results):
    head = ["library", "sampler + options"]
    cols = []
    for dataset in DATASETS:
        for metric in (["sw", "fd"] if DATASETS[dataset][0] > 2 else ["sw"]):
            for b in NFE_BUDGETS:
                head.append(f"{dataset} {metric.upper()} @{b}")
                cols.append((dataset, metric, b))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    winners = {c: min(min(results[lib][r][c[0]][c[2]][c[1]] for r in results[lib]) for lib in ("ours", "diffusers"))
               for c in cols}
    for lib in ("ours", "diffusers"):
        for label, row in results[lib].items():
            cells = []
            for dataset, metric, b in cols:
                m = row[dataset][b]
                v = f"{m[metric]:.4f}"
                if m["nfe"] != b:
                    v += f" ({m['nfe']:.0f})"
                if m[metric] == winners[(dataset, metric, b)]:
                    v = f"**{v}**"
                cells.append(v)
            lines.append(f"| {lib} | {label} | " + " | ".join(cells) + " |")
    floor = ["noise floor", "two true samples"]
    for dataset, metric, b in cols:
        floor.append(f"{results['floor'][dataset][metric]:.4f}")
    lines.append("| " + " | ".join(floor) + " |")
    return "\n".join(lines)


def summary(results):
    lines = []
    for dataset in DATASETS:
        for b in NFE_BUDGETS:
            lo, vo = best(results, "ours", dataset, b)
            ld, vd = best(results, "diffusers", dataset, b)
            lines.append(f"{dataset} NFE {b:>2}: ours {vo:.4f} ({lo})  vs  diffusers {vd:.4f} ({ld})"
                         f"  -> {'ours' if vo < vd else 'diffusers'} better by {abs(vo - vd) / max(vo, vd):.0%};"
                         f" floor {results['floor'][dataset]['sw']:.4f}")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams = ["ddim", "dpmpp_2m", "euler", "heun", "unipc"] + sorted(
        {r.split()[0] for r in results["ours"]} - {"ddim", "dpmpp_2m", "euler", "heun", "unipc", "ddpm", "euler_ancestral"})
    colors = dict(zip(fams, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(DATASETS), figsize=(6 * len(DATASETS), 4.6))
    for ax, dataset in zip(axes, DATASETS):
        for lib, style in (("ours", "-o"), ("diffusers", "--s")):
            for fam in fams:
                rows = {r: v for r, v in results[lib].items() if r.split()[0] == fam}
                if not rows:
                    continue
                # the family's best configuration at NFE 10, drawn at every budget
                label = min(rows, key=lambda r: rows[r][dataset][10]["sw"])
                nfes = [rows[label][dataset][b]["nfe"] for b in NFE_BUDGETS]
                sws = [rows[label][dataset][b]["sw"] for b in NFE_BUDGETS]
                ax.plot(nfes, sws, style, color=colors[fam], ms=4, alpha=0.9 if lib == "ours" else 0.6,
                        label=f"{lib}: {label}")
        ax.axhline(results["floor"][dataset]["sw"], color="k", lw=1, ls=":", label="noise floor (two true samples)")
        ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)", ylabel="sliced Wasserstein to truth",
               title=f"{dataset} Gaussian mixture, exact denoiser")
        ax.set_xticks(list(NFE_BUDGETS), [str(b) for b in NFE_BUDGETS])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=6.5, loc="upper right")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="samples per run (and in each true sample)")
    p.add_argument("--seeds", type=int, default=3, help="seeds; numbers are medians over seeds")
    p.add_argument("--schedule", choices=sorted(DIFFUSERS_SCHEDULE), default="linear")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one (dataset, seed) each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    p.add_argument("--plot", default=None, help="write the NFE plot to this PNG")
    args = p.parse_args()
    import diffusers
    start = time.time()
    results = run(args)
    print(f"# schedule={args.schedule} T=1000 beta 1e-4..0.02 epsilon; n={args.n} seeds={args.seeds}; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.jobs} processes x {args.threads} threads; {time.time() - start:.0f} s")
    print(markdown_table(results))
    print()
    print(summary(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
