"""Training and sampling throughput of the diffusekit UNet against diffusers and lucidrains UNets.

MNIST-size models (28x28, 1 channel) at matched parameter counts, same batch size and threads.
  training: images/s of forward + backward + AdamW step (eps-prediction MSE loss)
  sampling: images/s of a forward pass without grad (one denoiser call per image)
Each number is the median over --repeats timed repeats of --steps iterations, after warm-up;
models and precisions are interleaved within each repeat so that machine drift hits all alike.
FLOPs per image come from torch.utils.flop_counter.FlopCounterMode (forward, fp32).
Peak memory is the ru_maxrss delta (resource.getrusage) of a fresh subprocess per model and
precision: maxrss after 3 training steps minus maxrss after building the model and batch
(activations, gradients and AdamW state of a training step; spawned before the parent grows,
since a Linux child inherits its parent's maxrss).

Usage:  .venv/bin/python bench/train_throughput.py [--batch-size 64] [--repeats 5] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.nn.unet import UNet, UNetConfig

IMAGE_SIZE, CHANNELS = 28, 1


def build(name: str) -> torch.nn.Module:
    """One of the three 28x28 UNets, wrapped to the call `model(x, t) -> eps` (~1.1-1.2M params each)."""
    if name == "diffusekit":
        return UNet(UNetConfig.preset("mnist28"))        # widths 32/64/64, 1 res block, attention at 7x7
    if name == "diffusers":
        from diffusers import UNet2DModel
        net = UNet2DModel(sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS,
                          block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                          attention_head_dim=16,
                          down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
        return _Wrap(net, lambda m, x, t: m(x, t, return_dict=False)[0])
    if name == "lucidrains":
        Unet = _import_lucidrains_unet()
        net = Unet(dim=24, dim_mults=(1, 2, 3), channels=CHANNELS)   # 28 -> 14 -> 7
        return _Wrap(net, lambda m, x, t: m(x, t))
    raise ValueError(name)


class _Wrap(torch.nn.Module):
    def __init__(self, net, call):
        super().__init__()
        self.net, self.call = net, call

    def forward(self, x, t):
        return self.call(self.net, x, t)


def _import_lucidrains_unet():
    # denoising_diffusion_pytorch imports torchvision (for its Trainer's transforms and image
    # saving), which is not installed here. The Unet itself never uses it, so for this import
    # only we put an empty stub `torchvision` into sys.modules, and remove it straight after so
    # that nothing else (e.g. diffusers' availability checks) ever sees it.
    import diffusers  # noqa: F401  (imported first: its torchvision probe fails on a stub)
    stub_names = ["torchvision", "torchvision.transforms", "torchvision.utils"]
    added = [n for n in stub_names if n not in sys.modules]
    for n in added:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    try:
        from denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet
    finally:
        for n in added:
            del sys.modules[n]
    return Unet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def make_batch(batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    return x, t, eps


class Runner:
    """One model at one precision: a training step and a sampling forward, timed on demand."""

    def __init__(self, name: str, precision: str, batch_size: int):
        torch.manual_seed(0)  # benchmark entry point: identical inits across runs
        self.model = build(name)
        if precision not in ("fp32", "bf16", "bf16+cl"):
            raise ValueError(f"precision={precision!r}; expected fp32, bf16 or bf16+cl")
        self.bf16 = precision.startswith("bf16")
        self.x, self.t, self.eps = make_batch(batch_size)
        if precision == "bf16+cl":
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
            self.eps = self.eps.contiguous(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def train_step(self):
        with self.autocast():
            loss = F.mse_loss(self.model(self.x, self.t).float(), self.eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def sample_step(self):
        with self.autocast():
            self.model(self.x, self.t)

    def timed(self, fn, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t0


def flops_per_image(name: str, batch_size: int) -> float:
    model = build(name)
    x, t, _ = make_batch(batch_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() / batch_size


def memory_worker(name: str, precision: str, batch_size: int, threads: int) -> None:
    """Run in a fresh process: print the maxrss growth (MiB) over 3 training steps."""
    torch.set_num_threads(threads)
    runner = Runner(name, precision, batch_size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        runner.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_delta_mib": (peak - base) / 1024}))   # Linux: ru_maxrss is in KiB


def peak_memory(name: str, precision: str, batch_size: int, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-worker", name, precision,
                          "--batch-size", str(batch_size), "--threads", str(threads)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_delta_mib"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="iterations per timed repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="diffusekit,diffusers,lucidrains")
    ap.add_argument("--precisions", default="fp32,bf16,bf16+cl")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        return memory_worker(*args.memory_worker, args.batch_size, args.threads)

    torch.set_num_threads(args.threads)
    B = args.batch_size
    configs = [(m, p) for m in args.models.split(",") for p in args.precisions.split(",")]
    # memory first: on Linux a child starts with its parent's maxrss, so spawn while we are small
    peak_mib = {c: peak_memory(*c, B, args.threads) for c in configs}
    runners = {c: Runner(*c, B) for c in configs}
    for r in runners.values():                       # warm-up: allocator, oneDNN kernel selection
        r.train_step(); r.train_step(); r.sample_step(); r.sample_step()
    train_s = {c: [] for c in configs}
    sample_s = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c, r in runners.items():
            train_s[c].append(r.timed(r.train_step, args.steps))
            sample_s[c].append(r.timed(r.sample_step, args.steps))
    results = []
    for c in configs:
        name, precision = c
        results.append(dict(
            model=name, precision=precision, params=n_params(runners[c].model),
            train_img_s=B * args.steps / statistics.median(train_s[c]),
            sample_img_s=B * args.steps / statistics.median(sample_s[c]),
            gflops_fwd_per_img=flops_per_image(name, B) / 1e9,
            peak_mem_mib=peak_mib[c]))
    header = ("| model | precision | params | train img/s | sample img/s | fwd GFLOP/img | peak mem MiB |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"threads={args.threads} batch={B} repeats={args.repeats} steps={args.steps}")
    print(header)
    for r in results:
        print(f"| {r['model']} | {r['precision']} | {r['params'] / 1e6:.2f}M | {r['train_img_s']:.0f} | "
              f"{r['sample_img_s']:.0f} | {r['gflops_fwd_per_img']:.3f} | {r['peak_mem_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
