"""Classifier guidance on an unconditional model: judge accuracy of the requested class per scale.

Trains (or reuses) three things on the built-in digits, all in OUT:
  OUT/uncond   an unconditional diffusion run (--train-steps steps)
  OUT/guide    a noise-aware classifier on x_t with the run's schedule (train-classifier --noise-aware)
  OUT/judge    an independent clean-image classifier (another seed), which scores the samples
then samples --n images per class with classifier guidance toward that class at each --scales value
and prints the judge's accuracy (at scale 0 it is the unconditional model's class frequency, ~10%).

Usage:  OMP_NUM_THREADS=2 .venv/bin/python bench/classifier_guidance.py --out runs/cg \
            [--train-steps 2000] [--n 20] [--scales 0 1 2 4 8] [--steps 25] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusekit import store as ckpt
from diffusekit.store.classifier import ClassifierTrainConfig, load_classifier
from diffusekit.training.classifier import train_classifier
from diffusekit.data import DataConfig
from diffusekit.evaluation import judge_accuracy
from diffusekit.pipeline import Pipeline
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training import train


def prepare(out: Path, train_steps: int, classifier_steps: int) -> None:
    if not ckpt.has_checkpoint(out / "uncond"):
        cfg, data = resolve_run_config({"data.source": "digits", "data.class_labels": False,
                                        "train.steps": train_steps, "train.sample_every": 0})
        train(cfg, out / "uncond", dataset=data)
    run_cfg = Pipeline.load(out / "uncond").config
    for name, noise_aware, seed in (("guide", True, 0), ("judge", False, 1)):
        if not (out / name / "classifier.safetensors").exists():
            train_classifier(DataConfig("digits"), out / name, train_cfg=ClassifierTrainConfig(
                steps=classifier_steps, batch_size=128, noise_aware=noise_aware, seed=seed),
                schedule_cfg=run_cfg.schedule)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--n", type=int, default=20, help="images per class")
    ap.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    prepare(args.out, args.train_steps, args.classifier_steps)
    pipe = Pipeline.load(args.out / "uncond", device="cpu")
    guide, _ = load_classifier(args.out / "guide")
    judge, _ = load_classifier(args.out / "judge")
    target = torch.arange(10).repeat_interleave(args.n)
    rows = []
    for scale in args.scales:
        t0 = time.time()
        x = pipe.sample(len(target), args.sampler, args.steps, generator=torch.Generator().manual_seed(0),
                        classifier=guide, classifier_scale=scale, target_class=target)
        acc = judge_accuracy(judge, x, target)
        rows.append({"scale": scale, "judge_accuracy": acc, "seconds": time.time() - t0})
        print(f"classifier scale {scale:g}: judge accuracy {acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
