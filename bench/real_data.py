"""Real data at a fixed CPU budget: Fashion-MNIST and an RGB image folder, FD against held-out images.

For each data set the script trains one run for --budget-cpu-min minutes of this process's CPU time
(steps = budget / CPU s per step, measured on a short probe run, so the cosine schedule ends at the
budget), then samples --n images with the EMA weights (dpmpp_2m, 20 steps, bf16 autocast) and
scores them against held-out images the run never saw (diffusekit.evaluation.evaluate_run):
  * fashion: Fashion-MNIST train (60,000, 28x28 grayscale, 10 classes; class-conditional, balanced
    labels k mod 10 when sampling) against t10k; features: raw pixels, and the features of a judge
    classifier trained on the train split by diffusekit's train_classifier (its "levels" view since
    2026-12, its penultimate layer before: bench/mnist_judge.py)
    (--judge-steps; 0 = raw pixels only);
  * shapes-rgb: an image folder of the `shapes` set written by write_shapes_folder (--shapes-train
    RGB 32x32 PNGs with metadata.jsonl, unconditional) against a folder of the set's `test` stream;
    features: raw pixels.
Noise floor: --n real *training* images scored exactly like the samples (same reference, same
features), the value a perfect model would read at this sample size.
Sample grids (100 samples, the seed fixed) go to --img-dir as small PNGs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_data.py --fashion path/to/fashion-mnist \
        --out /tmp/diffusekit-real --img-dir docs/img --budget-cpu-min 5
    .venv/bin/python bench/real_data.py --report /tmp/diffusekit-real/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from diffusekit import metrics as M
from diffusekit.data import DataConfig, load_dataset, write_shapes_folder
from diffusekit.evaluation import evaluate_run, feature_extractor, reference_statistics
from diffusekit.pipeline import Pipeline
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training import train

SAMPLER, SAMPLE_STEPS = "dpmpp_2m", 20
# a ~1.2M-parameter RGB UNet for 32x32 (the cifar32 preset, 35.7M, does not fit a CPU-minute budget)
SHAPES_MODEL = {"model.base_channels": 32, "model.channel_mult": (1, 2, 2), "model.num_res_blocks": 1,
                "model.attention_resolutions": (8,), "model.num_heads": 4, "model.groups": 8, "model.dropout": 0.0}
TRAIN = {"train.batch_size": 64, "train.precision": "bf16", "train.channels_last": True, "train.device": "cpu",
         "train.warmup_steps": 50, "train.log_every": 25, "train.sample_every": 0, "train.num_sample_images": 100}


def data_sets(args) -> dict[str, dict]:
    """name -> (train options, held-out DataConfig, judge-able)."""
    sets = {}
    if args.fashion:
        # the mnist28 widths, pinned (the numbers in docs/BENCHMARKS.md were measured with them)
        sets["fashion"] = {"options": {"data.source": str(args.fashion), "model.base_channels": 32,
                                       "model.channel_mult": [1, 2, 2]},
                           "heldout": DataConfig(source=str(args.fashion), split="t10k"), "labels": True}
    if args.shapes_train:
        train_dir, test_dir = args.out / "shapes-rgb-train", args.out / "shapes-rgb-test"
        for folder, n, split in ((train_dir, args.shapes_train, "train"), (test_dir, args.shapes_test, "test")):
            if not (folder / "metadata.jsonl").exists():         # written last: otherwise unfinished
                write_shapes_folder(folder, n, split=split, overwrite=True)
        sets["shapes-rgb"] = {"options": {"data.source": str(train_dir), "data.class_labels": False, **SHAPES_MODEL},
                              "heldout": DataConfig(source=str(test_dir), class_labels=False), "labels": False}
    return sets


def cpu_seconds_per_step(options: dict, out: Path) -> float:
    """CPU s per training step: (CPU of a 12-step run - CPU of a 2-step run) / 10 (set-up cancels)."""
    cpu = {}
    for steps in (2, 12):
        cfg, dataset = resolve_run_config({**options, **TRAIN, "train.steps": steps, "train.save_every": steps})
        shutil.rmtree(out / f"probe{steps}", ignore_errors=True)
        c0 = time.process_time()
        train(cfg, out / f"probe{steps}", dataset=dataset, progress=False)
        cpu[steps] = time.process_time() - c0
        shutil.rmtree(out / f"probe{steps}", ignore_errors=True)
    return (cpu[12] - cpu[2]) / 10


def train_budget(name: str, spec: dict, args) -> dict:
    per_step = cpu_seconds_per_step(spec["options"], args.out)
    steps = max(50, int(args.budget_cpu_min * 60 / per_step))
    print(f"{name}: {per_step:.3f} CPU s/step -> {steps} steps", flush=True)
    cfg, dataset = resolve_run_config({**spec["options"], **TRAIN, "train.steps": steps, "train.save_every": steps})
    run = args.out / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    c0, w0 = time.process_time(), time.time()
    result = train(cfg, run, dataset=dataset, progress=False)
    n_params = sum(p.numel() for p in result.model.parameters())
    return {"run": str(run), "steps": steps, "cpu_s_per_step_probe": per_step, "train_cpu_s": time.process_time() - c0,
            "train_wall_s": time.time() - w0, "final_loss": result.loss, "params": n_params,
            "images": len(dataset), "image_shape": [dataset.channels, dataset.image_size, dataset.image_size],
            "classes": cfg.model.num_classes, "batch_size": cfg.train.batch_size}


def judge(name: str, spec: dict, args) -> str | None:
    """A classifier trained on the training split (its features score the samples), or None."""
    if not spec["labels"] or args.judge_steps == 0:
        return None
    from diffusekit.store.classifier import ClassifierTrainConfig
    from diffusekit.training.classifier import train_classifier
    out = args.out / f"judge-{name}"
    if not (out / "config.json").exists():
        r = train_classifier(DataConfig(source=spec["options"]["data.source"]), out,
                             train_cfg=ClassifierTrainConfig(steps=args.judge_steps, device="cpu"), progress=False)
        print(f"{name} judge: held-out accuracy {r.accuracy:.4f}", flush=True)
    return f"classifier:{out}"


def noise_floor(spec: dict, features: str, n: int, cache: Path) -> dict:
    """n real training images scored like the samples: what a perfect model reads at this n."""
    extractor = feature_extractor(features)
    train_cfg = DataConfig(source=spec["options"]["data.source"], class_labels=spec["labels"])
    images = load_dataset(train_cfg).images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:n]
    ref = reference_statistics(spec["heldout"], extractor, cache)
    return M.evaluate(M.extract_features(images[pick], extractor), ref)


def evaluate(name: str, spec: dict, record: dict, args) -> dict:
    pipe = Pipeline.load(record["run"], device="cpu", precision="bf16")
    labels = "uniform" if spec["labels"] else None
    g = torch.Generator().manual_seed(0)
    grid_labels = torch.arange(100) % 10 if spec["labels"] else None
    x = pipe.sample(100, sampler=SAMPLER, num_steps=SAMPLE_STEPS, generator=g, class_labels=grid_labels)
    from diffusekit.viz import save_grid
    # small PNGs: 28 px images doubled, 32 px and up as they are
    grid = save_grid(x, args.img_dir / f"real_{name}_samples.png", nrow=10, upscale=2 if x.shape[-1] < 32 else 1)
    scores, judge_features = {}, judge(name, spec, args)
    for features in ["raw", *([judge_features] if judge_features else [])]:
        c0 = time.process_time()
        r = evaluate_run(pipe, spec["heldout"], args.n, sampler=SAMPLER, num_steps=SAMPLE_STEPS, features=features,
                         cache_dir=args.out / "cache", class_labels=labels, progress=False)
        r["eval_cpu_s"] = time.process_time() - c0
        r["floor"] = noise_floor(spec, features, args.n, args.out / "cache")
        scores["raw" if features == "raw" else "judge"] = r
        print(f"{name} [{features}]: FD {r['fd']:.3f} (floor {r['floor']['fd']:.3f})", flush=True)
    return {"grid": str(grid), "scores": scores}


def report(results: dict) -> str:
    m = results["machine"]
    head = (f"{m['cores']} cores ({m['cpu']}), OMP_NUM_THREADS={m['omp_num_threads']}, load average "
            f"{m['load_average'][0]:.1f} at the start and {m.get('load_average_end', [float('nan')])[0]:.1f} at the "
            f"end; budget {results['args']['budget_cpu_min']} CPU-min of training per data set; n = "
            f"{results['args']['n']} samples ({SAMPLER}, {SAMPLE_STEPS} steps, bf16).")
    rows = ["| data | params | images | steps x batch | train CPU min | train wall min | loss | features | FD | "
            "floor FD | KID | precision | recall |", "| --- " * 13 + "|"]
    for name, r in results["sets"].items():
        t = r["train"]
        for feat, s in r["eval"]["scores"].items():
            rows.append(f"| {name} | {t['params'] / 1e6:.2f}M | {t['images']:,} | {t['steps']} x {t['batch_size']} | "
                        f"{t['train_cpu_s'] / 60:.2f} | {t['train_wall_s'] / 60:.1f} | {t['final_loss']:.4f} | "
                        f"{feat} | {s['fd']:.3f} | {s['floor']['fd']:.3f} | {s['kid_mean']:.4f} | "
                        f"{s['precision']:.3f} | {s['recall']:.3f} |")
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion", type=Path, help="folder with the four Fashion-MNIST IDX files (.gz)")
    p.add_argument("--shapes-train", type=int, default=10000, help="RGB folder size; 0 = skip the RGB set")
    p.add_argument("--shapes-test", type=int, default=5000, help="held-out RGB folder size")
    p.add_argument("--out", type=Path, help="runs, generated folders and caches (outside the repository)")
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    p.add_argument("--budget-cpu-min", type=float, default=5.0)
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation")
    p.add_argument("--judge-steps", type=int, default=1000, help="Fashion-MNIST judge classifier; 0 = none")
    p.add_argument("--only", nargs="+", help="data set names to run (fashion, shapes-rgb)")
    p.add_argument("--report", type=Path, help="print the markdown table of a results JSON and exit")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    if args.out is None:
        p.error("--out is required (a folder outside the repository, e.g. /tmp/diffusekit-real)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.img_dir.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"sets": {}}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_average": os.getloadavg(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                          "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for name, spec in data_sets(args).items():
        if args.only and name not in args.only:
            continue
        record = {"train": train_budget(name, spec, args)}
        record["eval"] = evaluate(name, spec, record["train"], args)
        results["sets"][name] = record
        results["machine"]["load_average_end"] = os.getloadavg()
        path.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
