"""Guidance and editing on a class-conditional MNIST model, judged by an independent MNIST classifier.

Four measurements, each on the same trained run (EMA weights, bf16 autocast by default):

1. Classifier-free guidance: for every scale w, n_per_class samples per class (balanced); the share
   the judge assigns to the requested class, the mean judge confidence in it, and the diversity
   within a class: mean pairwise L2 distance of the judge's features (its "levels" view since 2026-12,
   its penultimate layer before; bench/mnist_judge.py) (and of pixels)
   among the samples of one class, averaged over classes. The same starting noise for every w.
   w = 0 is the unconditional model (eps_uncond), run as class label -1 without the CFG wrapper
   (identical output: the wrapper's (1 - w) eps_u + w eps_c is exactly eps_u at w = 0).
   Reference: the same diversity numbers on n_per_class real t10k digits per class.
2. DDIM inversion: held-out t10k digits -> x_T -> DDIM back, conditioned on the true class;
   PSNR (data range 2, images in [-1, 1]) of the reconstruction, mean and min, per step count and
   number of fixed-point refinement iterations.
3. SDEdit: t10k digits d edited toward class (d + 1) % 10 with CFG scale w_edit, for several
   strengths; faithfulness = RMSE to the input (pixels in [-1, 1]), realism/success = the judge's
   softmax probability of the requested class (and its accuracy).
4. Inpainting: t10k digits with the lower half masked (mask = 1 on rows H/2..H-1) and filled,
   unconditionally (label -1) and conditioned on the true class, with resample = 1 (replacement)
   and resample = r (RePaint); judge accuracy w.r.t. the true label. Baseline: the masked input with
   the lower half set to -1 (background), unfilled.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python bench/guidance_editing.py --run runs/mnist \
            --judge runs/judge --data path/to/mnist [--n-per-class 50] [--n-invert 100] [--n-edit 100] \
            [--n-inpaint 100] [--json out.json] [--img-dir docs/img] [--only cfg,invert,sdedit,inpaint]

--run: a class-conditional MNIST run (`diffusekit train`); --judge: a `diffusekit train-classifier`
folder trained on MNIST; --data: a folder with the MNIST IDX files (the t10k split is used).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

import diffusekit as dk
from diffusekit.store.classifier import load_classifier
from diffusekit.data import DataConfig, load_dataset
from diffusekit.metrics import psnr
from diffusekit.evaluation import judge_accuracy
from diffusekit.viz import make_grid, plot_curves


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def judge_probs(judge, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([F.softmax(judge(b), dim=1) for b in x.split(batch)])


@torch.no_grad()
def judge_features(judge, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([judge.features(b) for b in x.split(batch)])


def mean_pairwise(x: torch.Tensor) -> float:
    """Mean L2 distance over all unordered pairs of rows of x (N, D)."""
    x = x.reshape(len(x), -1).double()
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def diversity(judge, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(feature, pixel) mean pairwise distance within each class, averaged over classes."""
    feats = judge_features(judge, images)
    f, p = [], []
    for c in labels.unique():
        sel = labels == c
        if int(sel.sum()) >= 2:
            f.append(mean_pairwise(feats[sel]))
            p.append(mean_pairwise(images[sel]))
    return float(np.mean(f)), float(np.mean(p))


def fig_grids(grids: list[np.ndarray], titles: list[str], path: str, ncols: int | None = None) -> None:
    from matplotlib.figure import Figure
    ncols = ncols or len(grids)
    nrows = math.ceil(len(grids) / ncols)
    import textwrap
    h, w = max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)
    cell_w = max(w / 90, 3.0)
    fig = Figure(figsize=(cell_w * ncols, (h / 90 + 0.6) * nrows), layout="constrained")
    for k, (g, t) in enumerate(zip(grids, titles)):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(g[:, :, 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(textwrap.fill(t, int(cell_w * 12)), fontsize=9)
        ax.axis("off")
    fig.savefig(path, dpi=110)


# --- 1. classifier-free guidance -----------------------------------------------------------

def bench_cfg(pipe, judge, real, args, res):
    n_pc = args.n_per_class
    labels = torch.arange(10).repeat_interleave(n_pc)
    noise = torch.randn((len(labels), *pipe.image_shape), generator=torch.Generator().manual_seed(args.seed))
    rows, grids = [], []
    for w in args.cfg_scales:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed + 1)
        if w == 0:
            x = pipe.sample(len(labels), args.sampler, args.steps, g, class_labels=-1, noise=noise,
                            batch_size=args.batch_size)
        else:
            x = pipe.sample(len(labels), args.sampler, args.steps, g, class_labels=labels, guidance_scale=w,
                            noise=noise, batch_size=args.batch_size)
        secs = time.perf_counter() - t0
        probs = judge_probs(judge, x)
        acc = judge_accuracy(judge, x, labels)
        conf = float(probs[torch.arange(len(labels)), labels].mean())
        fdiv, pdiv = diversity(judge, x, labels)
        # per-class accuracy, to show where errors sit
        pred = probs.argmax(1)
        per_class = [float((pred[labels == c] == c).double().mean()) for c in range(10)]
        rows.append(dict(w=w, acc=acc, conf=conf, feat_div=fdiv, pix_div=pdiv, min_class_acc=min(per_class),
                         worst_class=int(np.argmin(per_class)), seconds=secs))
        log(f"cfg w={w}: acc={acc:.4f} conf={conf:.4f} feat_div={fdiv:.3f} pix_div={pdiv:.2f} ({secs:.0f}s)")
        # 10 classes x 8 samples
        idx = torch.cat([torch.arange(c * n_pc, c * n_pc + min(8, n_pc)) for c in range(10)])
        grids.append(make_grid(x[idx], nrow=min(8, n_pc), upscale=1))
    # real reference
    rl, rx = real
    sel = torch.cat([torch.nonzero(rl == c).flatten()[:n_pc] for c in range(10)])
    fdiv, pdiv = diversity(judge, rx[sel], rl[sel])
    res["cfg"] = dict(rows=rows, n=len(labels), real_feat_div=fdiv, real_pix_div=pdiv,
                      real_acc=judge_accuracy(judge, rx[sel], rl[sel]))
    log(f"cfg real reference: feat_div={fdiv:.3f} pix_div={pdiv:.2f}")
    if args.img_dir:
        fig_grids(grids, [f"w = {w}" + (" (uncond.)" if w == 0 else "") for w in args.cfg_scales],
                  f"{args.img_dir}/guidance_cfg_grid.png")
        plot_curves({"judge accuracy": ([r["w"] for r in rows], [r["acc"] for r in rows]),
                     "feature diversity / real": ([r["w"] for r in rows], [r["feat_div"] / fdiv for r in rows])},
                    f"{args.img_dir}/guidance_cfg_tradeoff.png", xlabel="guidance scale w",
                    ylabel="accuracy  |  diversity relative to real",
                    title=f"CFG on MNIST ({args.sampler}, {args.steps} steps, n={len(labels)})")


# --- 2. DDIM inversion ---------------------------------------------------------------------

def bench_invert(pipe, test, args, res, pipe32=None):
    labels, images = test
    x, y = images[:args.n_invert], labels[:args.n_invert]
    rows, examples = [], {}
    cells = [(st, r) for st in args.invert_steps for r in args.invert_refine]
    cells = [(st, r, pipe, args.precision) for st, r in cells]
    cells += [(*(int(v) for v in c.split(":")), pipe, args.precision) for c in args.invert_extra]
    if pipe32 is not None:
        cells += [(*(int(v) for v in c.split(":")), pipe32, "fp32") for c in args.invert_fp32]
    for steps, refine, pipe, prec in cells:
        if True:
            t0 = time.perf_counter()
            recs = []
            for s in range(0, len(x), args.batch_size):
                xb, yb = x[s:s + args.batch_size], y[s:s + args.batch_size]
                xT = pipe.invert(xb, num_steps=steps, refine_steps=refine, class_labels=yb)
                recs.append(pipe.reconstruct(xT, num_steps=steps, class_labels=yb).clamp(-1, 1))
            rec = torch.cat(recs)
            secs = time.perf_counter() - t0
            p = [psnr(rec[i], x[i]) for i in range(len(x))]
            rows.append(dict(steps=steps, refine=refine, precision=prec, mean=float(np.mean(p)), median=float(np.median(p)),
                             min=float(np.min(p)), share_40=float(np.mean(np.array(p) >= 40)), seconds=secs))
            if prec == args.precision:
                examples[(steps, refine)] = rec[:8]
            log(f"invert {prec} steps={steps} refine={refine}: mean={np.mean(p):.2f} min={np.min(p):.2f} dB ({secs:.0f}s)")
    res["invert"] = dict(rows=rows, n=len(x))
    if args.img_dir:
        keys = list(examples)
        stack = torch.cat([x[:8]] + [examples[k] for k in keys])
        grid = make_grid(stack, nrow=8, upscale=2)
        fig_grids([grid], ["rows: input; then " + ", ".join(f"{s} steps/refine {r}" for s, r in keys)],
                  f"{args.img_dir}/guidance_inversion.png")
        series = {}
        for r in sorted({row["refine"] for row in rows}):
            pts = [row for row in rows if row["refine"] == r and row["precision"] == args.precision]
            series[f"refine {r} (mean)"] = ([p["steps"] for p in pts], [p["mean"] for p in pts])
            series[f"refine {r} (min)"] = ([p["steps"] for p in pts], [p["min"] for p in pts])
        plot_curves(series, f"{args.img_dir}/guidance_inversion_psnr.png", xlabel="DDIM steps",
                    ylabel="reconstruction PSNR (dB)", logx=True,
                    title=f"DDIM inversion round trip, n={len(x)} t10k digits")


# --- 3. SDEdit -----------------------------------------------------------------------------

def bench_sdedit(pipe, judge, test, args, res):
    labels, images = test
    off = args.n_invert  # different digits than inversion
    x, y = images[off:off + args.n_edit], labels[off:off + args.n_edit]
    target = (y + 1) % 10
    p_in = judge_probs(judge, x)
    rows = [dict(strength=0.0, rmse=0.0, conf_target=float(p_in[torch.arange(len(x)), target].mean()),
                 acc_target=judge_accuracy(judge, x, target), acc_source=judge_accuracy(judge, x, y), seconds=0.0)]
    outs = []
    for s in args.strengths:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed + 2)
        parts = []
        for b in range(0, len(x), args.batch_size):
            parts.append(pipe.edit(x[b:b + args.batch_size], strength=s, sampler=args.sampler, num_steps=args.steps,
                                   generator=g, class_labels=target[b:b + args.batch_size],
                                   guidance_scale=args.edit_w))
        e = torch.cat(parts)
        secs = time.perf_counter() - t0
        pr = judge_probs(judge, e)
        rmse = float(((e - x) ** 2).mean(dim=(1, 2, 3)).sqrt().mean())
        rows.append(dict(strength=s, rmse=rmse, conf_target=float(pr[torch.arange(len(x)), target].mean()),
                         acc_target=judge_accuracy(judge, e, target), acc_source=judge_accuracy(judge, e, y),
                         seconds=secs))
        outs.append(e[:8])
        log(f"sdedit s={s}: rmse={rmse:.3f} conf_target={rows[-1]['conf_target']:.3f} "
            f"acc_target={rows[-1]['acc_target']:.3f} acc_source={rows[-1]['acc_source']:.3f} ({secs:.0f}s)")
    res["sdedit"] = dict(rows=rows, n=len(x), w=args.edit_w)
    if args.img_dir:
        plot_sdedit(rows, len(x), args.edit_w, f"{args.img_dir}/guidance_sdedit_curve.png")
        # columns: input, s = ...; rows: 8 examples
        stack = torch.stack([x[:8]] + outs, dim=1).reshape(-1, *x.shape[1:])
        fig_grids([make_grid(stack, nrow=1 + len(outs), upscale=2)],
                  ["input | strength " + " ".join(f"{s}" for s in args.strengths) + " (target (d+1)%10)"],
                  f"{args.img_dir}/guidance_sdedit_examples.png")


def plot_sdedit(rows: list[dict], n: int, w: float, path: str) -> None:
    """The realism/faithfulness curve: judge P(target) and accuracy against RMSE to the input."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["rmse"] for r in rows], [r["conf_target"] for r in rows], marker="o", label="P_judge(target)")
    ax.plot([r["rmse"] for r in rows], [r["acc_target"] for r in rows], marker="s", ls="--",
            label="judge accuracy (target)")
    for k, r in enumerate(rows):
        ax.annotate(f"s={r['strength']:.1f}", (r["rmse"], r["conf_target"]), textcoords="offset points",
                    xytext=(-8, -14 if k % 2 == 0 else 8), fontsize=8)
    ax.set_xlabel("RMSE to the input (pixels in [-1, 1]; lower = more faithful)")
    ax.set_ylabel("realism / edit success")
    ax.set_title(f"SDEdit d -> (d+1) % 10, CFG w={w:g}, n={n}")
    ax.set_ylim(-0.08, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left")
    fig.savefig(path, dpi=110)


# --- 4. inpainting -------------------------------------------------------------------------

def bench_inpaint(pipe, judge, test, args, res):
    labels, images = test
    off = args.n_invert + args.n_edit
    x, y = images[off:off + args.n_inpaint], labels[off:off + args.n_inpaint]
    H = x.shape[-2]
    mask = torch.zeros(1, 1, H, x.shape[-1])
    mask[..., H // 2:, :] = 1
    masked = torch.where(mask.bool(), torch.full_like(x, -1.0), x)
    rows = [dict(cond="(unfilled, lower half = -1)", resample="-", acc=judge_accuracy(judge, masked, y), seconds=0.0),
            dict(cond="(full original)", resample="-", acc=judge_accuracy(judge, x, y), seconds=0.0)]
    log(f"inpaint baseline: masked acc={rows[0]['acc']:.3f} original acc={rows[1]['acc']:.3f}")
    shows = [x[:8], masked[:8]]
    titles = []
    for cond in ("none", "true class"):
        for r in args.resample:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(args.seed + 3)
            parts = []
            for b in range(0, len(x), args.batch_size):
                lab = -1 if cond == "none" else y[b:b + args.batch_size]
                parts.append(pipe.inpaint(x[b:b + args.batch_size], mask, sampler=args.inpaint_sampler,
                                          num_steps=args.inpaint_steps, generator=g, resample=r, class_labels=lab))
            out = torch.cat(parts)
            secs = time.perf_counter() - t0
            keep_ok = bool(torch.equal(out * (1 - mask), x * (1 - mask)))
            rows.append(dict(cond=cond, resample=r, acc=judge_accuracy(judge, out, y), seconds=secs, keep_exact=keep_ok))
            shows.append(out[:8])
            titles.append(f"{cond}/r={r}")
            log(f"inpaint cond={cond} resample={r}: acc={rows[-1]['acc']:.3f} known pixels exact={keep_ok} ({secs:.0f}s)")
    res["inpaint"] = dict(rows=rows, n=len(x), sampler=args.inpaint_sampler, steps=args.inpaint_steps)
    if args.img_dir:
        stack = torch.stack(shows, dim=1).reshape(-1, *x.shape[1:])
        fig_grids([make_grid(stack, nrow=len(shows), upscale=2)],
                  ["original | masked | " + " | ".join(titles)], f"{args.img_dir}/guidance_inpaint_examples.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a class-conditional MNIST run folder")
    ap.add_argument("--judge", required=True, help="a `diffusekit train-classifier` folder (MNIST)")
    ap.add_argument("--data", required=True, help="folder with the MNIST IDX files (t10k is used)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"],
                    help="autocast of the network call (fp16: GPUs only)")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--cfg-scales", type=float, nargs="+", default=[0, 1, 2, 3, 5])
    ap.add_argument("--n-invert", type=int, default=50)
    ap.add_argument("--invert-steps", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--invert-refine", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--invert-extra", nargs="*", default=["20:10", "50:10"], help="extra STEPS:REFINE cells")
    ap.add_argument("--invert-fp32", nargs="*", default=["20:10"],
                    help="STEPS:REFINE cells repeated with an fp32 network (is bf16 the limit?)")
    ap.add_argument("--n-edit", type=int, default=100)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--edit-w", type=float, default=2.0)
    ap.add_argument("--n-inpaint", type=int, default=200)
    ap.add_argument("--inpaint-sampler", default="ddim")
    ap.add_argument("--inpaint-steps", type=int, default=20)
    ap.add_argument("--resample", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="cfg,invert,sdedit,inpaint")
    ap.add_argument("--json", default="")
    ap.add_argument("--img-dir", default="")
    args = ap.parse_args()
    if args.img_dir:
        os.makedirs(args.img_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    pipe = dk.Pipeline.load(args.run, precision=args.precision)
    judge, _ = load_classifier(args.judge)
    judge.eval()
    ds = load_dataset(DataConfig(source=args.data, split="t10k"))
    # a fixed random permutation of t10k, so the subsets are not the file's first digits only
    perm = torch.randperm(len(ds.images), generator=torch.Generator().manual_seed(1234))
    test = (ds.labels[perm], ds.images[perm])
    res = dict(run=args.run, precision=args.precision, sampler=args.sampler, steps=args.steps,
               machine=f"{platform.machine()} {platform.processor() or ''}".strip(), threads=args.threads,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        with open(f"{args.run}/metrics.jsonl") as f:
            last = [json.loads(l) for l in f if l.strip()][-1]
        res["train_step"] = last.get("step")
    except Exception:  # noqa: BLE001
        pass
    only = set(args.only.split(","))
    log(f"loaded {args.run} ({args.precision}); judge {args.judge}; t10k {len(ds.images)} images")
    if "cfg" in only:
        bench_cfg(pipe, judge, test, args, res)
    if "invert" in only:
        pipe32 = dk.Pipeline.load(args.run, precision="fp32") if args.invert_fp32 else None
        bench_invert(pipe, test, args, res, pipe32)
    if "sdedit" in only:
        bench_sdedit(pipe, judge, test, args, res)
    if "inpaint" in only:
        bench_inpaint(pipe, judge, test, args, res)
    res["total_seconds"] = time.perf_counter() - t_all
    log(f"total {res['total_seconds']:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(markdown(res))


def markdown(res: dict) -> str:
    """The result tables as Markdown (what docs/BENCHMARKS.md shows)."""
    out = []
    if "cfg" in res:
        c = res["cfg"]
        out += [f"CFG: n = {c['n']} ({c['n'] // 10} per class), {res['sampler']} {res['steps']} steps.", "",
                "| w | judge accuracy | mean P(requested) | worst class (acc) | feature diversity | pixel diversity | s |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in c["rows"]:
            out.append(f"| {r['w']:g}{' (uncond.)' if r['w'] == 0 else ''} | {100 * r['acc']:.1f}% | {r['conf']:.3f} | "
                       f"{r['worst_class']} ({100 * r['min_class_acc']:.0f}%) | {r['feat_div']:.3f} | {r['pix_div']:.2f} | "
                       f"{r['seconds']:.0f} |")
        out.append(f"| real t10k (same n) | {100 * c['real_acc']:.1f}% | - | - | {c['real_feat_div']:.3f} | "
                   f"{c['real_pix_div']:.2f} | - |")
        out.append("")
    if "invert" in res:
        c = res["invert"]
        out += [f"DDIM inversion: n = {c['n']} t10k digits.", "",
                "| steps | refine | network | mean PSNR (dB) | median | min | share >= 40 dB | s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in c["rows"]:
            out.append(f"| {r['steps']} | {r['refine']} | {r['precision']} | {r['mean']:.2f} | {r['median']:.2f} | {r['min']:.2f} | "
                       f"{100 * r['share_40']:.0f}% | {r['seconds']:.0f} |")
        out.append("")
    if "sdedit" in res:
        c = res["sdedit"]
        out += [f"SDEdit: n = {c['n']} t10k digits, target (d + 1) % 10, CFG w = {c['w']:g}, {res['sampler']} "
                f"{res['steps']}-step plan.", "",
                "| strength | RMSE to input | mean P(target) | judge -> target | judge -> source | s |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in c["rows"]:
            out.append(f"| {r['strength']:.1f} | {r['rmse']:.3f} | {r['conf_target']:.3f} | {100 * r['acc_target']:.1f}% | "
                       f"{100 * r['acc_source']:.1f}% | {r['seconds']:.0f} |")
        out.append("")
    if "inpaint" in res:
        c = res["inpaint"]
        out += [f"Inpainting (lower half): n = {c['n']} t10k digits, {c['sampler']} {c['steps']} steps.", "",
                "| conditioning | resample | judge accuracy (true label) | s |", "| --- | --- | --- | --- |"]
        for r in c["rows"]:
            out.append(f"| {r['cond']} | {r['resample']} | {100 * r['acc']:.1f}% | {r['seconds']:.0f} |")
        out.append("")
    out.append(f"Total {res['total_seconds'] / 60:.1f} min.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
