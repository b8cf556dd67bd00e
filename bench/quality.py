"""Sample quality versus model evaluations (NFE) for every sampler in the registry, on MNIST.

For the class-conditional MNIST run (EMA weights, bf16 autocast, balanced class labels k mod 10,
no classifier-free guidance) each cell samples n images with one sampler at one NFE budget and
scores them against MNIST t10k with the judge classifier's features (`--judge`, a `diffusekit
train-classifier` folder; its "levels" view since 2026-12, its penultimate layer before: bench/mnist_judge.py):
Frechet distance (vs the Gaussian of all 10,000 test images), KID, precision/recall (k = 3) and the judge's accuracy on the requested classes.

  * budgets: NFE 5, 10, 20, 50, 100; the step count per sampler is the largest with
    sampler.nfe(steps) <= budget (Heun: 2 steps - 1 evaluations), the NFE reported is counted
    with a hook on the network; DDPM with 1000 steps is the reference.
  * every cell uses the same seed: the same starting noise and labels for every sampler.
  * noise floor: FD etc. between two disjoint random n-subsets of the test set (5 splits), and
    n real *training* images scored exactly like a model (against all 10,000 test images).
  * cells run in priority order (NFE 10, DDPM-1000, NFE 5 and 20, NFE 50, NFE 100) and a cell
    is skipped when its estimated time would pass --budget-min; features of every cell are saved
    (out/features/*.npy), so metrics at a smaller sample size (--n-goal, the first n-goal samples
    of each cell) come for free; DDPM-1000 is sampled at n-goal only when time is short.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py run --run runs/mnist --judge runs/judge \
        --data path/to/mnist --budget-min 28
    .venv/bin/python bench/quality.py report     # markdown tables + docs/img/quality_fd_vs_nfe.png

--data is a folder with the MNIST IDX files (train and t10k); `report` reuses the run's --judge and
--data, saved in out/results.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs/bench_cache"     # reference statistics, keyed by data and judge digest
NFES = (5, 10, 20, 50, 100)
STOCHASTIC = {"ddpm", "euler_ancestral"}


def steps_for_budget(sampler, budget: int) -> int:
    """Largest step count whose NFE (sampler.nfe) is at most budget."""
    best = 1
    for k in range(1, budget + 1):
        if sampler.nfe(k) <= budget:
            best = k
    return best


def plan(pipe, samplers: list[str], nfes=NFES) -> list[dict]:
    """Cells in priority order: NFE 10, DDPM-1000, NFE 5 and 20, 50, 100."""
    def cell(name, budget):
        return {"id": f"{name}-nfe{budget}", "sampler": name, "budget": budget,
                "steps": steps_for_budget(pipe.sampler_for(name), budget)}
    order = [10, "ddpm1000", 5, 20, 50, 100]
    cells = []
    for item in order:
        if item == "ddpm1000":
            cells.append({"id": "ddpm-1000", "sampler": "ddpm", "budget": 1000, "steps": 1000})
        elif item in nfes:
            cells += [cell(s, item) for s in samplers]
    return cells


def load_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"cells": {}, "floor": {}}


def save_results(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))


def reference(extractor, data: Path, cache: Path = CACHE):
    from diffusekit.data import DataConfig
    from diffusekit.evaluation import reference_statistics
    return reference_statistics(DataConfig(source=str(data), split="t10k", class_labels=False), extractor, cache)


def metrics_at(features: np.ndarray, ref, n: int) -> dict:
    from diffusekit import metrics as M
    return M.evaluate(features[:n], ref, seed=0)


def noise_floor(extractor, ref, data: Path, sizes: list[int], splits: int = 5) -> dict:
    """Real-vs-real metrics at each sample size: disjoint test subsets, and train images vs ref."""
    from diffusekit import metrics as M
    from diffusekit.data import DataConfig, load_dataset
    test = load_dataset(DataConfig(source=str(data), split="t10k", class_labels=False)).images
    train = load_dataset(DataConfig(source=str(data), split="train", class_labels=False)).images
    f_test = M.extract_features(test, extractor, batch_size=500)
    order = np.random.default_rng(123).permutation(len(train))[:max(sizes)]
    f_train = M.extract_features(train[torch.from_numpy(order)], extractor, batch_size=500)
    floor = {}
    for n in sizes:
        rows = []
        for seed in range(splits):
            perm = np.random.default_rng(seed).permutation(len(f_test))
            rows.append(M.evaluate(f_test[perm[:n]], f_test[perm[n:2 * n]], seed=seed))
        agg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        agg["fd_std"] = float(np.std([r["fd"] for r in rows]))
        floor[str(n)] = {"test_halves": agg, "train_vs_ref": metrics_at(f_train, ref, n), "splits": splits}
    return floor


def run(args) -> None:
    from diffusekit.evaluation import feature_extractor, generate_features
    from diffusekit.pipeline import Pipeline
    from diffusekit.samplers import SAMPLERS
    from diffusekit.seeding import derive_seed
    torch.set_num_threads(args.threads)
    out = args.out
    (out / "features").mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    t_start = time.time()
    pipe = Pipeline.load(args.run, precision=args.precision)
    extractor = feature_extractor(f"classifier:{args.judge}")
    ref = reference(extractor, args.data)
    # judge and data absolute, so that `report` finds them from any working directory
    results["meta"] = {"run": str(args.run), "judge": str(args.judge.resolve()), "data": str(args.data.resolve()),
                       "n": args.n, "n_goal": args.n_goal, "precision": args.precision,
                       "threads": args.threads, "batch_size": args.batch_size, "features": extractor.name,
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
                       "timestep_spacing": "trailing (Pipeline default)", "guidance_scale": 1.0}
    if not results["floor"]:
        results["floor"] = noise_floor(extractor, ref, args.data, sorted({args.n, args.n_goal}))
        save_results(out, results)
    samplers = sorted(SAMPLERS) if not args.samplers else args.samplers
    rate = args.images_per_s     # network images per second, updated from every finished cell
    skipped = []
    for cell in plan(pipe, samplers, args.nfe):
        if cell["id"] in results["cells"]:
            continue
        nfe = pipe.sampler_for(cell["sampler"]).nfe(cell["steps"])
        n = args.n
        left = args.budget_min * 60 - (time.time() - t_start)
        if nfe * n / rate > left and cell["id"] == "ddpm-1000":
            n = args.n_goal                      # the reference at the smaller size rather than none
        if nfe * n / rate > left:
            skipped.append(cell["id"])
            print(f"skip {cell['id']}: needs ~{nfe * n / rate / 60:.1f} min, {left / 60:.1f} min left", flush=True)
            continue
        t0 = time.time()
        local = generate_features(pipe, extractor, n, cell["sampler"], cell["steps"],
                                  derive_seed(args.seed, "rank", 0), args.batch_size, class_labels="uniform",
                                  judge=extractor.model, progress=False)
        wall = time.time() - t0
        rate = local["model_images"] / wall
        feats = local["features"].astype(np.float32)
        np.save(out / "features" / f"{cell['id']}.npy", feats)
        record = {**cell, "n": n, "nfe": local["model_images"] / n, "wall_time_s": wall,
                  "judge_accuracy": local["judge_correct"] / n, "images_per_s": rate,
                  "at_n": {str(m): metrics_at(feats, ref, m) for m in sorted({n, args.n_goal}) if m <= n}}
        results["cells"][cell["id"]] = record
        save_results(out, results)
        m = record["at_n"][str(n)]
        print(f"{cell['id']:>22} steps {cell['steps']:4d} NFE {record['nfe']:6.1f} n {n} FD {m['fd']:.3f} "
              f"KID {m['kid_mean']:.4f} P {m['precision']:.3f} R {m['recall']:.3f} "
              f"acc {record['judge_accuracy']:.3f} {wall:.0f}s", flush=True)
    results["skipped"] = skipped
    results["total_wall_s"] = results.get("total_wall_s", 0) + time.time() - t_start
    save_results(out, results)


# ---------------------------------------------------------------------------------------------
# report


def report(args) -> None:
    results = load_results(args.out)
    cells, floor, meta = results["cells"], results["floor"], results["meta"]
    n = meta["n"]
    lines = []
    samplers = sorted({c["sampler"] for c in cells.values() if c["id"] != "ddpm-1000"})
    budgets = sorted({c["budget"] for c in cells.values() if c["id"] != "ddpm-1000"})

    lines.append(f"FD (judge features) at n = {n}; each entry `FD (NFE)`, - = not run:\n")
    lines.append("| sampler | " + " | ".join(f"NFE <= {b}" for b in budgets) + " |")
    lines.append("| --- |" + " --- |" * len(budgets))
    for s in samplers:
        row = []
        for b in budgets:
            c = cells.get(f"{s}-nfe{b}")
            row.append(f"{c['at_n'][str(n)]['fd']:.3f} ({c['nfe']:g})" if c and str(n) in c["at_n"] else "-")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    fl = floor[str(n)]
    lines.append(f"| *noise floor*: test vs test, n = {n} | {fl['test_halves']['fd']:.3f} "
                 f"(std {fl['test_halves']['fd_std']:.3f}) |" + " |" * (len(budgets) - 1))
    lines.append(f"| *noise floor*: {n} train images vs test | {fl['train_vs_ref']['fd']:.3f} |"
                 + " |" * (len(budgets) - 1))

    lines.append(f"\nAll metrics per cell (n = {n}):\n")
    lines.append("| cell | steps | NFE | FD | KID | precision | recall | judge acc. | wall s |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cid in sorted(cells, key=lambda c: (cells[c]["sampler"], cells[c]["budget"])):
        c = cells[cid]
        m = c["at_n"].get(str(n))
        if m is None:
            continue
        lines.append(f"| {cid} | {c['steps']} | {c['nfe']:g} | {m['fd']:.3f} | {m['kid_mean']:.4f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {c['judge_accuracy']:.3f} | {c['wall_time_s']:.0f} |")
    for label, key in (("test vs test (mean of splits)", "test_halves"), ("train images vs test", "train_vs_ref")):
        m = fl[key]
        lines.append(f"| floor: {label} | | | {m['fd']:.3f} | {m['kid_mean']:.4f} | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | | |")

    # the goal: best sampler at NFE 10 against DDPM-1000, at the size DDPM-1000 was sampled at
    ref_cell = cells.get("ddpm-1000")
    if ref_cell:
        m_goal = str(ref_cell["n"])
        ten = {cid: c for cid, c in cells.items() if c["budget"] == 10 and m_goal in c["at_n"]}
        lines.append(f"\nGoal check at n = {m_goal} (first {m_goal} samples of each cell; same noise and labels):\n")
        lines.append("| cell | NFE | FD | KID | precision | recall | FD / FD(DDPM-1000) | judge acc. (n = all) |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        ref_fd = ref_cell["at_n"][m_goal]["fd"]
        for cid, c in sorted(ten.items(), key=lambda kv: kv[1]["at_n"][m_goal]["fd"]) + [("ddpm-1000", ref_cell)]:
            m = c["at_n"][m_goal]
            lines.append(f"| {cid} | {c['nfe']:g} | {m['fd']:.3f} | {m['kid_mean']:.4f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['fd'] / ref_fd:.2f} | {c['judge_accuracy']:.3f} ({c['n']}) |")
        fg = floor.get(m_goal)
        if fg:
            lines.append(f"| floor: test vs test | | {fg['test_halves']['fd']:.3f} (std {fg['test_halves']['fd_std']:.3f}) "
                         f"| {fg['test_halves']['kid_mean']:.4f} | {fg['test_halves']['precision']:.3f} | "
                         f"{fg['test_halves']['recall']:.3f} | | |")
            lines.append(f"| floor: train vs test | | {fg['train_vs_ref']['fd']:.3f} | {fg['train_vs_ref']['kid_mean']:.4f} "
                         f"| {fg['train_vs_ref']['precision']:.3f} | {fg['train_vs_ref']['recall']:.3f} | | |")
        spread = subset_spread(args.out, ten, int(m_goal), meta["n"], args.judge or meta.get("judge"),
                               args.data or meta.get("data"))
        if spread:
            lines.append(f"\nFD spread of the NFE-10 cells over the {meta['n'] // int(m_goal)} disjoint {m_goal}-subsets "
                         f"of their {meta['n']} samples (mean +- std): "
                         + ", ".join(f"{cid} {m:.3f} +- {sd:.3f}" for cid, (m, sd) in sorted(spread.items(),
                                                                                           key=lambda kv: kv[1][0])))
        if ten:
            best_id = min(ten, key=lambda cid: ten[cid]["at_n"][m_goal]["fd"])
            ratio = ten[best_id]["at_n"][m_goal]["fd"] / ref_fd
            lines.append(f"\nbest at NFE 10: {best_id}, FD {ten[best_id]['at_n'][m_goal]['fd']:.3f} vs DDPM-1000 "
                         f"{ref_fd:.3f}: ratio {ratio:.2f} -> goal (<= 1.10) {'MET' if ratio <= 1.10 else 'NOT met'}")
    if results.get("skipped"):
        lines.append(f"\nskipped for time: {', '.join(results['skipped'])}")
    print("\n".join(lines))
    plot(results, args.plot)


def subset_spread(out: Path, cells: dict, size: int, n: int, judge, data) -> dict:
    """FD (mean, std) over the disjoint size-subsets of each cell's saved features."""
    from diffusekit import metrics as M
    from diffusekit.evaluation import feature_extractor
    if size >= n:
        return {}
    if not judge or not data:
        raise SystemExit(f"{out}/results.json does not name the judge and data it was run with; "
                         f"pass --judge and --data to `report`.")
    ref = reference(feature_extractor(f"classifier:{judge}"), Path(data))
    spread = {}
    for cid in cells:
        path = out / "features" / f"{cid}.npy"
        if not path.exists() or size >= n:
            continue
        feats = np.load(path).astype(np.float64)
        fds = [M.frechet_distance(*M.feature_stats(feats[i:i + size]), ref.mu, ref.sigma)
               for i in range(0, len(feats) - size + 1, size)]
        spread[cid] = (float(np.mean(fds)), float(np.std(fds)))
    return spread


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells, floor, meta = results["cells"], results["floor"], results["meta"]
    sizes = [meta["n"]]
    if "ddpm-1000" in cells and cells["ddpm-1000"]["n"] != meta["n"]:
        sizes.append(cells["ddpm-1000"]["n"])
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5.6 * (len(sizes) + 1), 4.4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        key = str(n)
        for s in sorted({c["sampler"] for c in cells.values()}):
            pts = sorted((c["nfe"], c["at_n"][key]["fd"]) for cid, c in cells.items()
                         if c["sampler"] == s and cid != "ddpm-1000" and key in c["at_n"])
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if s in STOCHASTIC else "-", label=s)
        if "ddpm-1000" in cells and key in cells["ddpm-1000"]["at_n"]:
            ax.plot([1000], [cells["ddpm-1000"]["at_n"][key]["fd"]], "k*", ms=12, label="ddpm, 1000 steps")
        if key in floor:
            ax.axhline(floor[key]["test_halves"]["fd"], color="gray", ls=":", label="floor: test vs test")
            ax.axhline(floor[key]["train_vs_ref"]["fd"], color="gray", ls="-.", label="floor: train images vs test")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel("FD, judge features")
        ax.set_title(f"MNIST, n = {n}")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[0][-1]
    for s in sorted({c["sampler"] for c in cells.values()}):
        pts = sorted((c["nfe"], c["judge_accuracy"]) for cid, c in cells.items()
                     if c["sampler"] == s and cid != "ddpm-1000")
        if pts:
            ax.plot(*zip(*pts), marker="o", ls="--" if s in STOCHASTIC else "-", label=s)
    if "ddpm-1000" in cells:
        ax.plot([1000], [cells["ddpm-1000"]["judge_accuracy"]], "k*", ms=12,
                label=f"ddpm, 1000 steps (n = {cells['ddpm-1000']['n']})")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("judge accuracy on the requested digit")
    ax.set_title(f"class fidelity, n = {meta['n']}")
    ax.grid(True, which="both", alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.set_xticks([5, 10, 20, 50, 100, 1000], ["5", "10", "20", "50", "100", "1000"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--run", type=Path, required=True, help="a class-conditional MNIST run folder")
    r.add_argument("--judge", type=Path, required=True, help="a `diffusekit train-classifier` folder (MNIST)")
    r.add_argument("--data", type=Path, required=True, help="folder with the MNIST IDX files (train, t10k)")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16",
                   help="autocast of the network call (fp16: GPUs only)")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--n-goal", type=int, default=200, help="smaller size for DDPM-1000 when time is short")
    r.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    r.add_argument("--samplers", nargs="+", default=None, help="default: every sampler in the registry")
    r.add_argument("--budget-min", type=float, default=28.0)
    r.add_argument("--images-per-s", type=float, default=250.0, help="first guess of network images/s")
    r.add_argument("--batch-size", type=int, default=100)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, default=ROOT / "runs/quality")
    p = sub.add_parser("report")
    p.add_argument("--out", type=Path, default=ROOT / "runs/quality")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/img/quality_fd_vs_nfe.png")
    p.add_argument("--judge", type=Path, default=None, help="default: the one saved in out/results.json")
    p.add_argument("--data", type=Path, default=None, help="default: the one saved in out/results.json")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
