"""Sampling speed with CUDA graphs (fastpath.GraphedModel) against the eager network, on a GPU.

For each preset and batch size: one Pipeline on the GPU, classifier-free guidance 2 (the model runs on
2 x batch), DPM-Solver++(2M) with --steps steps; images/s of whole `Pipeline.sample` calls (model
calls, guidance and solver arithmetic; torch.cuda.synchronize() before each clock read), eager and
with `use_cuda_graphs("on")`, timed alternately, median of --repeats after one warm-up call (the
warm-up call of the graphed pipeline is where its graphs are captured and checked). The samples of
the two paths are compared: the largest absolute difference is printed (the paths run the same
kernels, so it should be 0 or at float rounding).

    python bench/cuda_graphs.py --presets mnist28-lean mnist28 64 --batch 1 8 64 --json runs/cuda_graphs.json

Refuses to run without a CUDA device (there is nothing to measure).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule


def timed(fn) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(preset: str, batch: int, args) -> dict:
    torch.manual_seed(0)        # bench-only: parameter init (speed does not depend on the weights)
    model = UNet(UNetConfig.preset(preset, num_classes=10)).cuda()
    cfg = model.config
    schedule = NoiseSchedule.create("cosine", num_train_timesteps=1000)
    pipes = {}
    for path in ("eager", "graphs"):
        pipes[path] = Pipeline(model, schedule, image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
                               num_classes=10, device="cuda", precision=args.precision)
    pipes["graphs"].use_cuda_graphs("on")

    def run(path):
        return pipes[path].sample(batch, "dpmpp_2m", args.steps, generator=torch.Generator().manual_seed(0),
                                  class_labels=torch.arange(batch) % 10, guidance_scale=2.0, batch_size=batch)
    outs = {path: run(path) for path in pipes}            # warm-up (and capture)
    times = {path: [] for path in pipes}
    for _ in range(args.repeats):
        for path in pipes:
            seconds, outs[path] = timed(lambda: run(path))
            times[path].append(seconds)
    med = {path: statistics.median(v) for path, v in times.items()}
    graphed = pipes["graphs"].graphed
    return {"preset": preset, "batch": batch, "steps": args.steps, "precision": args.precision,
            "eager_img_s": batch / med["eager"], "graphs_img_s": batch / med["graphs"],
            "speedup": med["eager"] / med["graphs"], "graphs": len(graphed.graphs), "eager_fallbacks": graphed.eager,
            "max_abs_diff": (outs["graphs"] - outs["eager"]).abs().max().item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mnist28-lean", "mnist28", "64"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/cuda_graphs.py needs a CUDA GPU; none is visible to this process.", file=sys.stderr)
        return 2
    rows = []
    for preset in args.presets:
        for batch in args.batch:
            rows.append(measure(preset, batch, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
