"""Equal quality at equal training: diffusers' UNet2DModel against diffusekit's presets on MNIST.

The speed goals of issue 12 are stated "at matched parameters and equal FD": a faster network only
counts if it trains to the same quality in the same number of steps. Each arm below is trained by
`diffusekit.training.train` with the same recipe (the 10-minute unconditional recipe: batch 32,
v-prediction, cosine schedule, bf16, AdamW with the default lr / warm-up / EMA), the same data order
and the same number of optimiser steps, then scored the same way (bench/quality_per_minute.py: 1,000
DDIM-20 samples, FD of the judge's features against MNIST t10k, confident share).

Arms (`--arm`):
  diffusers   UNet2DModel(block_out_channels=(32, 64, 64), layers_per_block=1, attention at 7x7), 1.11M
              parameters (bench/train_throughput.py's peer), behind diffusekit's model contract
              (interop.diffusers.DiffusersUNet); NCHW (its faster layout)
  mnist28     diffusekit's mnist28 preset: widths 32/64/64, 1.19M
  mnist28-lean  widths 16/32/80 (the `mnist28-lean` preset), 1.02M: fewer channels where the feature
              maps are large, more where they are small; 0.19 GFLOP per image against 0.38

    OMP_NUM_THREADS=1 .venv/bin/python bench/equal_quality.py --arm diffusers --steps 1600 --seed 0 \\
        --judge runs/judge --data path/to/mnist [--out runs/equal_quality]
    .venv/bin/python bench/equal_quality.py --report [--out runs/equal_quality]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_per_minute as qpm  # noqa: E402
from train_throughput import diffusers_unet2d  # noqa: E402

ARMS = {"diffusers": {"train.channels_last": False},
        "mnist28": {},
        "mnist28-lean": {"model.base_channels": 16, "model.channel_mult": [1, 2, 5]}}
RECIPE = "b32-v-cosine"


def train_arm(args) -> dict:
    import diffusekit.training.diffusion as train_module
    from diffusekit.interop.diffusers import DiffusersUNet
    from diffusekit.training.resolve import resolve_run_config
    options = {**qpm.base_options(args.data, args.seed, args.steps), **qpm.RECIPES[RECIPE], **ARMS[args.arm]}
    cfg, dataset = resolve_run_config(options)
    if args.arm == "diffusers":      # the trainer builds this network instead of its own UNet
        train_module.build_model = lambda _cfg: DiffusersUNet(diffusers_unet2d())
    name = f"{args.arm}-{args.steps}-s{args.seed}"
    run_dir = args.out / "runs" / name
    c0, w0 = time.process_time(), time.time()
    result = train_module.train(cfg, run_dir, progress=False, dataset=dataset)
    record = {"name": name, "arm": args.arm, "options": options, "seed": args.seed, "steps": result.step,
              "cpu_s": time.process_time() - c0, "wall_s": time.time() - w0, "final_loss": result.loss,
              "params": qpm.n_params(result.ema_model), "loadavg_end_train": os.getloadavg()}
    print(f"{name}: trained {record}", flush=True)
    from diffusekit.pipeline import Pipeline
    from diffusekit.schedule import NoiseSchedule
    pipe = Pipeline(result.ema_model, NoiseSchedule.from_config(cfg.schedule), image_shape=(1, 28, 28),
                    prediction_type=cfg.model.prediction_type, precision="bf16")
    scoring = SimpleNamespace(n=args.n, steps=args.sampler_steps, judge=args.judge, data=args.data)
    record["eval"] = qpm.score_pipe(pipe, scoring, args.out / "results" / f"{name}.npz")
    record.update(qpm.meta(args))
    path = args.out / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"{name}: fd {record['eval']['fd']:.3f} confident {record['eval']['confident']:.3f}", flush=True)
    return record


def report(out: Path) -> str:
    import statistics
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    lines = ["| arm | params | seed | steps x batch | train CPU-s | CPU-s / step | loss | FD | confident >= 0.9 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_arm: dict[str, list] = {}
    for r in rows:
        e = r["eval"]
        by_arm.setdefault(r["arm"], []).append(e["fd"])
        lines.append(f"| {r['arm']} | {r['params'] / 1e6:.2f}M | {r['seed']} | {r['steps']} x 32 | {r['cpu_s']:.0f} | "
                     f"{r['cpu_s'] / r['steps']:.3f} | {r['final_loss']:.4f} | {e['fd']:.3f} | {e['confident']:.3f} |")
    lines.append("")
    for arm, fds in by_arm.items():
        lines.append(f"{arm}: FD median {statistics.median(fds):.3f} over {len(fds)} seed(s), "
                     f"range {min(fds):.3f}-{max(fds):.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", type=Path, default=Path("runs/judge"))
    ap.add_argument("--data", type=Path, help="the MNIST folder (IDX files)")
    ap.add_argument("--out", type=Path, default=Path("runs/equal_quality"))
    ap.add_argument("--n", type=int, default=1000, help="samples scored")
    ap.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps of the scored samples")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        print(report(args.out))
        return
    if args.arm is None or args.data is None:
        ap.error("give --arm and --data (or --report)")
    torch.set_num_threads(1)
    train_arm(args)


if __name__ == "__main__":
    main()
