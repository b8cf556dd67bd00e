"""Training speed of the 32x32 colour layouts on this machine: cifar32 (DDPM's CIFAR-10 UNet, the default on
a GPU) against cifar32-lean (the default on a CPU), as `diffusekit train` would run them.

For each layout: the run config `diffusekit train --data FOLDER --preset NAME` resolves for a folder of
32x32 RGB images (written to a temporary folder), then training.estimate.estimate_run_time at --batch-size
with no budget (so at that batch itself): one warm-up step, then the median of 3 timed optimisation steps
(loss, backward, AdamW, EMA: the trainer's denoising_step). The layouts are timed in turn, --rounds times,
and each layout's median over its rounds is reported, so machine drift hits both alike.

Usage:  .venv/bin/python bench/cpu_layouts.py [--batch-size 16] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusekit.nn.unet import UNet
from diffusekit.training.estimate import estimate_run_time
from diffusekit.training.resolve import resolve_run_config

LAYOUTS = ("cifar32", "cifar32-lean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(Path(folder) / f"{i}.png")
        cfgs = {name: resolve_run_config({"data.source": folder, "train.device": "cpu",
                                          "train.batch_size": args.batch_size}, preset=name)[0] for name in LAYOUTS}
        default = resolve_run_config({"data.source": folder, "train.device": "cpu"})[0].model
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name, cfg in cfgs.items():
            times[name].append(estimate_run_time(cfg, budget_s=float("inf")).seconds_per_step)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, {args.rounds} rounds")
    print(f"{'layout':<14}{'parameters':>12}{'weights MB':>12}{'s/step':>9}{'img/s':>8}  per round (s/step)")
    for name, cfg in cfgs.items():
        n = UNet(cfg.model).num_parameters()
        step = statistics.median(times[name])
        print(f"{name:<14}{n:>12,}{4 * n / 1e6:>12.1f}{step:>9.2f}{args.batch_size / step:>8.2f}  "
              f"{', '.join(f'{t:.2f}' for t in times[name])}")
    lean = cfgs["cifar32-lean"].model
    print(f"default on this CPU: base {default.base_channels}, mult {default.channel_mult}, "
          f"{default.num_res_blocks} res block(s) = cifar32-lean: {default == lean}")


if __name__ == "__main__":
    main()
