"""Training and sampling throughput of the diffusekit UNet against diffusers' UNet2DModel, with FLOP/s.

MNIST-size models (28x28, 1 channel) at matched parameter counts (diffusekit: the mnist28 preset and the
mnist28-lean preset, which moves the channels to the small feature maps), same threads, one process:
  train     images/s of forward + backward + AdamW step (eps-prediction MSE loss), batch --batch-size
  sample    images/s of one denoiser call under torch.no_grad(), batch --batch-size
  sample1   the same at batch 1 (the interactive case), --single-calls calls per timed repeat
Variants: fp32, bf16 (torch.autocast), +cl (channels_last model and inputs), +compile
(diffusekit.fastpath.maybe_compile: torch.compile with inductor), +freeze (sampling only: the
weights folded into the compiled graph). Each number is the median over --repeats timed repeats after
warm-up; within a repeat every runner is timed in turn, so that machine drift hits all alike.
--clock cpu times with time.process_time (CPU seconds of this process: robust on a shared machine
with --threads 1, where waiting for the CPU is not counted; with more threads it sums them);
--clock wall times with time.perf_counter (the number to quote from a quiet machine).
FLOPs per image: torch.utils.flop_counter.FlopCounterMode (forward; forward + backward for training).
Peak: the fastest of fp32 and bf16 square matmuls (1024-3072) on the same threads and clock, same run;
"% peak" = achieved FLOP/s / that peak. Compile time: first call minus an ordinary one (wall, and CPU
seconds including the compiler's subprocesses), each from an empty on-disk inductor cache (cold; kernels
already compiled in this process are still reused) unless --warm-cache (inductor's default cache directory).
Compiled outputs (sampling) and loss and gradients (training) are checked against the eager model's.

Usage:  .venv/bin/python bench/train_throughput.py [--threads 1 --clock cpu] [--repeats 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.device import has_native_bf16
from diffusekit.fastpath import maybe_compile
from diffusekit.nn.unet import UNet, UNetConfig

IMAGE_SIZE, CHANNELS, TASKS = 28, 1, ("train", "sample", "sample1")
DEFAULT_VARIANTS = {"diffusekit": "fp32,bf16,bf16+cl,bf16+compile,bf16+compile+freeze",
                    "diffusekit-lean": "fp32,bf16,bf16+cl,bf16+compile,bf16+compile+freeze",
                    "diffusers": "fp32,bf16,bf16+cl", "lucidrains": "fp32,bf16,bf16+cl"}


def build(name: str) -> torch.nn.Module:
    """One of the 28x28 UNets, wrapped to the call `model(x, t) -> eps` (~1.1-1.2M parameters each)."""
    if name in ("diffusekit", "diffusekit-lean"):
        # mnist28: widths 32/64/64, 1 res block, attention at 7x7; mnist28-lean: widths 16/32/80
        model = UNet(UNetConfig.preset("mnist28" if name == "diffusekit" else "mnist28-lean"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():       # weights for the zero-initialised layers: compiled-vs-eager checks compare
            for p in model.parameters():                # non-zero outputs
                if not p.any():
                    p.normal_(0.0, 0.02, generator=g)
        return model
    if name == "diffusers":
        return _Wrap(diffusers_unet2d(), lambda m, x, t: m(x, t, return_dict=False)[0])
    if name == "lucidrains":
        net = _import_lucidrains_unet()(dim=24, dim_mults=(1, 2, 3), channels=CHANNELS)   # 28 -> 14 -> 7
        return _Wrap(net, lambda m, x, t: m(x, t))
    raise ValueError(f"unknown model {name!r}; expected {', '.join(DEFAULT_VARIANTS)}")


def diffusers_unet2d():
    """The peer: diffusers' UNet2DModel matched to mnist28 (widths 32/64/64, 1 res block, attention at 7x7)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS,
                       block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                       attention_head_dim=16,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


class _Wrap(torch.nn.Module):
    def __init__(self, net, call):
        super().__init__()
        self.net, self.call = net, call

    def forward(self, x, t):
        return self.call(self.net, x, t)


def _import_lucidrains_unet():
    # denoising_diffusion_pytorch imports torchvision (for its Trainer), which is not installed here;
    # its Unet never uses it, so an empty stub stands in during this import only
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


def make_batch(batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g).float()
    return x, t, torch.randn(x.shape, generator=g)


def cpu_seconds(children: bool = False) -> float:
    """CPU seconds (user + system) of this process, plus its finished or waited-for children's if asked."""
    times = os.times()
    return times.user + times.system + (times.children_user + times.children_system if children else 0.0)


class Runner:
    """One model, variant and task: a step to time, its compile cost and its compiled-vs-eager error."""

    def __init__(self, name: str, variant: str, task: str, batch_size: int, backend: str = "inductor"):
        self.name, self.variant, self.task = name, variant, task
        flags = set(variant.split("+"))
        self.bf16, self.compiled = "bf16" in flags, "compile" in flags
        torch.manual_seed(0)   # benchmark entry point: identical inits across runners
        self.model = build(name)
        self.x, self.t, self.eps = make_batch(1 if task == "sample1" else batch_size)
        if "cl" in flags:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x, self.eps = (a.contiguous(memory_format=torch.channels_last) for a in (self.x, self.eps))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4) if task == "train" else None
        self.model.train(task == "train")
        self.reference = self.loss_and_grads(self.model) if self.compiled else None
        self.call = maybe_compile(self.model, self.compiled, freeze="freeze" in flags, dynamic=False, backend=backend)
        self.compile_wall = self.compile_cpu = self.error = None

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def loss_and_grads(self, call) -> torch.Tensor:
        """Training: the loss and all gradients as one vector (grads left zeroed); sampling: the output."""
        if self.task != "train":
            with torch.no_grad(), self.autocast():
                return call(self.x, self.t).float().flatten()
        with self.autocast():
            loss = F.mse_loss(call(self.x, self.t).float(), self.eps)
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        return torch.cat([loss.detach()[None]] + [g.float().flatten() for g in grads])

    def step(self) -> None:
        if self.task != "train":
            with torch.no_grad(), self.autocast():
                self.call(self.x, self.t)
            return
        with self.autocast():
            loss = F.mse_loss(self.call(self.x, self.t).float(), self.eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def warm_up(self, clock) -> None:
        """Two steps (the first compiles); for a compiled runner, its compile cost and error against eager."""
        wall, cpu = time.perf_counter(), cpu_seconds(children=True)
        if self.compiled:
            # the first compiled call, before any optimizer step: same weights as the eager reference
            out = self.loss_and_grads(self.call)
            self.error = ((out - self.reference).abs().max() / self.reference.abs().max()).item()
        self.step()
        first_wall, first_cpu = time.perf_counter() - wall, cpu_seconds(children=True) - cpu
        self.step()
        if self.compiled:
            # first_* spans the check's call and one step: compile cost = that minus two ordinary calls
            one_wall, one_cpu = time.perf_counter(), cpu_seconds()
            self.step()
            self.compile_wall = first_wall - 2 * (time.perf_counter() - one_wall)
            self.compile_cpu = first_cpu - 2 * (cpu_seconds() - one_cpu)

    def timed(self, clock, calls: int) -> float:
        start = clock()
        for _ in range(calls):
            self.step()
        return (clock() - start) / calls


def flops_per_image(name: str, task: str, batch_size: int = 8) -> float:
    """FLOPs of one image: forward (sampling) or forward + backward (training), fp32, by FlopCounterMode."""
    torch.manual_seed(0)
    model = build(name).train(task == "train")
    x, t, eps = make_batch(batch_size)
    counter = FlopCounterMode(display=False)
    with counter:
        if task == "train":
            F.mse_loss(model(x, t), eps).backward()
        else:
            with torch.no_grad():
                model(x, t)
    return counter.get_total_flops() / batch_size


def matmul_peak(clock, repeats: int, sizes=(1024, 2048, 3072)) -> dict[str, float]:
    """FLOP/s of square matmuls in fp32 and bf16 (the best size's median over repeats), on the current threads and clock."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for n in sizes:
            a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
            a @ b
            times = []
            for _ in range(repeats):
                start = clock()
                a @ b
                times.append(clock() - start)
            name = str(dtype).removeprefix("torch.")
            out[name] = max(out.get(name, 0.0), 2 * n ** 3 / statistics.median(times))
    return out


def measure(runners: list[Runner], clock, repeats: int, steps: int, single_calls: int) -> dict:
    """Median seconds per call of every runner, the runners interleaved within each repeat."""
    times = {id(r): [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            times[id(r)].append(r.timed(clock, single_calls if r.task == "sample1" else steps))
    return {id(r): statistics.median(v) for r, v in zip(runners, times.values())}


def build_runners(models: list[str], variants: dict[str, list[str]], batch_size: int, backend: str) -> list[Runner]:
    runners = []
    for name in models:
        for variant in variants[name]:
            for task in TASKS:
                if not ("freeze" in variant and task == "train"):     # frozen weights cannot train
                    runners.append(Runner(name, variant, task, batch_size, backend))
    return runners


def rows(runners: list[Runner], seconds: dict, batch_size: int, peak: float, flops: dict, clock_name: str) -> list:
    """One result row per model and variant: images/s, GFLOP/s and % of peak per task, compile cost, error."""
    out = {}
    for r in runners:
        row = out.setdefault((r.name, r.variant), dict(
            model=r.name, variant=r.variant, params=sum(p.numel() for p in r.model.parameters())))
        images = 1 if r.task == "sample1" else batch_size
        img_s = images / seconds[id(r)]
        fl = flops[(r.name, "train" if r.task == "train" else "sample")]
        row[f"{r.task}_img_s"] = img_s
        row[f"{r.task}_gflop_s"] = img_s * fl / 1e9
        row[f"{r.task}_peak_share"] = img_s * fl / peak
        row[f"{r.task}_s_per_call"] = seconds[id(r)]
        if r.compiled:
            row[f"{r.task}_compile_s"] = r.compile_cpu if clock_name == "cpu" else r.compile_wall
            row[f"{r.task}_compile_wall_s"] = r.compile_wall
            row[f"{r.task}_rel_error"] = r.error
    return list(out.values())


def _best(results: list, task: str, peers_compiled: bool) -> dict:
    """{model: (images/s, variant)} of each model's fastest variant (a peer's compiled ones only if asked)."""
    best = {}
    for r in results:
        if f"{task}_img_s" not in r or (not r["model"].startswith("diffusekit") and "compile" in r["variant"]
                                         and not peers_compiled):
            continue
        if r[f"{task}_img_s"] > best.get(r["model"], (0, ""))[0]:
            best[r["model"]] = (r[f"{task}_img_s"], r["variant"])
    return best


def summary(results: list, tasks=TASKS) -> list[str]:
    """Best variant per model and task, diffusekit / diffusers ratios, and compile break-even call counts.

    The ratio compares diffusekit's best (compiled or not) with diffusers' best precision run eagerly
    (how diffusers runs out of the box); where diffusers was also compiled, a second ratio includes it.
    """
    lines = []
    for task in tasks:
        for compiled in (False, True):
            best = _best(results, task, compiled)
            if compiled and best == _best(results, task, False):
                continue
            text = ", ".join(f"{m} {v:.1f} ({var})" for m, (v, var) in best.items())
            ratio = "".join(f" -> {ours} / diffusers = {best[ours][0] / best['diffusers'][0]:.2f}x"
                            for ours in ("diffusekit", "diffusekit-lean") if ours in best and "diffusers" in best)
            label = "with compiled peers" if compiled else "peers eager"
            lines.append(f"- {task} ({label}): best {text}{ratio}")
    for r in results:
        if "compile" not in r["variant"]:
            continue
        eager_variant = r["variant"].replace("+compile", "").replace("+freeze", "")
        eager = next((e for e in results if e["model"] == r["model"] and e["variant"] == eager_variant), None)
        for task in tasks:
            if eager is None or f"{task}_compile_s" not in r:
                continue
            gain = eager[f"{task}_s_per_call"] - r[f"{task}_s_per_call"]
            calls = f"{r[f'{task}_compile_s'] / gain:.0f} calls" if gain > 0 else "never (no gain)"
            lines.append(f"- {r['model']} {r['variant']} {task}: {eager[f'{task}_s_per_call'] / r[f'{task}_s_per_call']:.2f}x "
                         f"{eager_variant}; compile {r[f'{task}_compile_s']:.0f} s repaid after {calls}")
    return lines


def print_table(results: list, unit: str) -> None:
    print(f"| model | variant | params | train {unit} | sample {unit} | sample B=1 {unit} | train GFLOP/s (% peak) "
          f"| sample GFLOP/s (% peak) | B=1 GFLOP/s (% peak) | compile s (train / sample / B=1) | max rel. diff vs eager |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def cell(r, key, fmt):
        return fmt.format(r[key]) if r.get(key) is not None else "-"
    for r in results:
        flops = " | ".join(f"{r[f'{t}_gflop_s']:.0f} ({100 * r[f'{t}_peak_share']:.0f} %)" if f"{t}_gflop_s" in r
                           else "-" for t in TASKS)
        compile_s = " / ".join(cell(r, f"{t}_compile_s", "{:.0f}") for t in TASKS)
        errors = " / ".join(cell(r, f"{t}_rel_error", "{:.1e}") for t in TASKS)
        print(f"| {r['model']} | {r['variant']} | {r['params'] / 1e6:.2f}M | {cell(r, 'train_img_s', '{:.1f}')} | "
              f"{cell(r, 'sample_img_s', '{:.1f}')} | {cell(r, 'sample1_img_s', '{:.1f}')} | {flops} | "
              f"{compile_s if 'compile' in r['variant'] else '-'} | {errors if 'compile' in r['variant'] else '-'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="calls per timed repeat at --batch-size")
    ap.add_argument("--single-calls", type=int, default=20, help="calls per timed repeat at batch 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--models", default="diffusekit,diffusekit-lean,diffusers")
    for name, default in DEFAULT_VARIANTS.items():
        ap.add_argument(f"--{name}-variants", dest=f"{name.replace('-', '_')}_variants", default=default)
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (default: a cold one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)   # aot_eager: a quick smoke run
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # every compiled runner of one network shares its forward's code object, and each shape or weight set
    # is a recompile: past dynamo's limit (8) later runners would silently run eagerly
    torch._dynamo.config.recompile_limit = 64
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_start = os.getloadavg()
    models = args.models.split(",")
    variants = {m: getattr(args, f"{m.replace('-', '_')}_variants").split(",") for m in models}
    runners = build_runners(models, variants, args.batch_size, args.compile_backend)
    cold_dirs = []
    for r in runners:
        if r.compiled and not args.warm_cache:      # each compile starts from an empty on-disk cache
            cold_dirs.append(tempfile.mkdtemp(prefix="inductor_cold_"))
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_dirs[-1]
        r.warm_up(clock)
    peak_all = matmul_peak(clock, args.repeats)
    seconds = measure(runners, clock, args.repeats, args.steps, args.single_calls)
    peak_all.update({k: v for k, v in matmul_peak(clock, args.repeats).items() if v > peak_all[k]})
    peak = max(peak_all.values())
    flops = {(m, task): flops_per_image(m, task) for m in models for task in ("train", "sample")}
    results = rows(runners, seconds, args.batch_size, peak, flops, args.clock)
    for d in cold_dirs:
        shutil.rmtree(d, ignore_errors=True)
    unit = "img/s" if args.clock == "wall" else "img/CPU-s"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"native bf16: {has_native_bf16('cpu')}  threads={args.threads} clock={args.clock} batch={args.batch_size} "
          f"repeats={args.repeats} steps={args.steps} single_calls={args.single_calls}")
    print(f"# load average (1, 5, 15 min) at start {load_start}, at end {os.getloadavg()}")
    print("# matmul peak " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak_all.items())
          + "; FLOPs/image " + ", ".join(f"{m} {t} {v / 1e9:.3f} G" for (m, t), v in flops.items()))
    print_table(results, unit)
    print("\n".join(summary(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, peak_flop_s=peak_all, flops_per_image={f"{m}/{t}": v for (m, t), v in
                                                                                   flops.items()},
                           load_start=load_start, load_end=os.getloadavg(), args=vars(args)), f, indent=2)


if __name__ == "__main__":
    main()
