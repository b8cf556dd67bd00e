"""Memory and throughput of image folders streamed from disk against held in memory, at 5k and 50k images.

For each folder size (RGB 32x32 PNGs of the `shapes` set, written by write_shapes_folder under
--data-dir, outside the repository) and each path (in memory; streamed with 0, 1 or 2 DataLoader
workers), one fresh process:
  1. opens the folder (open_dataset with streaming forced on or off) and times it;
  2. loader alone: BatchSource.batch(step) for --loader-steps steps at --batch-size, images/s
     after the first batch (the first batch's time, worker start-up included, is reported apart),
     and the CPU it cost per image (this process plus its workers, first batch included);
  3. trains a small RGB UNet for --train-steps steps from the same data set (diffusekit.training.train,
     the workers given by train.num_workers); images/s is the mean of the trainer's logged windows
     of 10 steps after the first (metrics.jsonl), so start-up and the final save are left out;
     CPU s per step (process and workers) counts everything, start-up and save included;
  4. memory: the process's peak RSS (ru_maxrss), the largest worker's peak RSS (ru_maxrss of the
     reaped children) and the peak over time of the process tree's PSS (psutil, sampled every
     0.5 s at ~5 ms CPU per process per sample; PSS splits pages shared between the trainer and
     its forked workers, so it does not count them twice as summed RSS would). RSS right after
     the imports is the baseline.
  5. index: the Python heap the folder's index holds (tracemalloc around index_folder, in its own
     process): what grows with the folder when the pixels are streamed.
The driver imports neither torch nor numpy, so the measured processes do not inherit its peak RSS.

    OMP_NUM_THREADS=1 .venv/bin/python bench/data_memory.py --data-dir /tmp/diffusekit-data \
        --out out/data_memory.json
    .venv/bin/python bench/data_memory.py --report out/data_memory.json   # the markdown table
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PATHS = (("memory", 0), ("stream", 0), ("stream", 1), ("stream", 2))
LOG_EVERY = 10        # training throughput: the mean of the trainer's logged windows after the first


# ---------------------------------------------------------------------------------------------
# inside a measured process


class TreeMemory:
    """Samples the peak PSS (and summed RSS) of this process and its children in a background thread."""

    def __init__(self, every_s: float = 0.5):
        import threading

        import psutil
        self.proc, self.every_s = psutil.Process(), every_s
        self.peak_pss = self.peak_rss_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil
        while not self._stop.is_set():
            pss = rss = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_pss, self.peak_rss_sum = max(self.peak_pss, pss), max(self.peak_rss_sum, rss)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def small_rgb_run(batch_size: int, steps: int, workers: int, data):
    """A 32x32 RGB unconditional run with a small UNet (the data path, not the network, is measured)."""
    from diffusekit.nn.unet import UNetConfig
    from diffusekit.store.run_config import RunConfig, TrainConfig
    from diffusekit.schedule import ScheduleConfig
    model = UNetConfig(image_size=32, in_channels=3, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_resolutions=(), num_heads=2, groups=8, num_classes=0)
    return RunConfig(model=model, schedule=ScheduleConfig(), data=data,
                     train=TrainConfig(steps=steps, batch_size=batch_size, num_workers=workers, warmup_steps=5,
                                       log_every=LOG_EVERY, save_every=steps, sample_every=0, device="cpu"))


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers, once shut down)."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(folder: str, mode: str, workers: int, batch_size: int, loader_steps: int, train_steps: int,
            run_dir: str) -> dict:
    """One path on one folder: open, loader throughput, training throughput, peak memory (MiB)."""
    import resource

    import psutil
    import torch

    from diffusekit.data import BatchSource, DataConfig, open_dataset
    from diffusekit.training import train
    mib = 2 ** 20
    baseline = psutil.Process().memory_info().rss
    tree = TreeMemory()
    data_cfg = DataConfig(source=folder, class_labels=False)
    t0 = time.perf_counter()
    dataset = open_dataset(data_cfg, streaming=mode == "stream")
    open_s = time.perf_counter() - t0
    c0 = cpu_seconds()
    with BatchSource(dataset, batch_size, seed=0, num_workers=workers) as source:
        t0 = time.perf_counter()
        source.batch(0)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for step in range(1, loader_steps + 1):
            source.batch(step)
        loader_s = time.perf_counter() - t0
    del source                                # the workers are shut down and reaped: their CPU is counted
    loader_cpu_s = cpu_seconds() - c0
    cfg = small_rgb_run(batch_size, train_steps, workers, dataset.config)
    t0, c0 = time.perf_counter(), cpu_seconds()
    train(cfg, run_dir, dataset=dataset, progress=False)
    train_s, train_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    tree.stop()
    windows = [json.loads(line)["images_per_s"] for line in open(Path(run_dir) / "metrics.jsonl")]
    steady = windows[1:] or windows           # the first window holds the warm-up
    return {"folder_images": len(dataset), "mode": mode, "workers": workers, "batch_size": batch_size,
            "threads": torch.get_num_threads(), "open_s": open_s, "first_batch_s": first_s,
            "loader_images_per_s": loader_steps * batch_size / loader_s,
            "loader_cpu_ms_per_image": 1000 * loader_cpu_s / ((loader_steps + 1) * batch_size),
            "train_cpu_s_per_step": train_cpu_s / train_steps,
            "train_steps": train_steps, "train_s": train_s, "train_images_per_s": sum(steady) / len(steady),
            "baseline_rss_mib": baseline / mib,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / mib,
            "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / mib,
            "peak_tree_pss_mib": tree.peak_pss / mib, "peak_tree_rss_sum_mib": tree.peak_rss_sum / mib}


def index_memory(folder: str) -> dict:
    """Python heap held by the folder's index (paths, captions, metadata columns), by tracemalloc, in MiB."""
    import tracemalloc

    from diffusekit.data import DataConfig, index_folder
    tracemalloc.start()
    index = index_folder(DataConfig(source=folder, class_labels=False))
    held, peak = tracemalloc.get_traced_memory()
    return {"folder_images": len(index), "index_mib": held / 2 ** 20, "indexing_peak_mib": peak / 2 ** 20}


# ---------------------------------------------------------------------------------------------
# the driver (no torch here)


def child(*args: str) -> str:
    """Run this script's subcommand in a fresh Python and return its last stdout line."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def ensure_folder(data_dir: Path, n: int) -> Path:
    folder = data_dir / f"shapes-rgb-{n}"
    if not (folder / "metadata.jsonl").exists():     # written last: a folder without it is unfinished
        t0 = time.time()
        child("generate", str(folder), str(n))
        print(f"wrote {n} images to {folder} in {time.time() - t0:.0f} s", flush=True)
    return folder


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"{m['cores']} cores, OMP_NUM_THREADS={m['omp_num_threads']}, load average at the start "
             f"{m['load_average'][0]:.1f}; batch {results['args']['batch_size']}, "
             f"{results['args']['loader_steps']} loader steps, {results['args']['train_steps']} training steps.", "",
             "| images | path | workers | open s | first batch s | loader img/s | loader CPU ms/img | train img/s "
             "| train CPU s/step | RSS after imports MiB | peak RSS MiB | worker peak RSS MiB | tree peak PSS MiB |",
             "| --- " * 13 + "|"]
    for r in results["rows"]:
        workers = str(r["workers"]) if r["mode"] == "stream" else "-"
        worker_rss = f"{r['peak_worker_rss_mib']:.0f}" if r["workers"] else "-"
        lines.append(f"| {r['folder_images']:,} | {r['mode']} | {workers} | {r['open_s']:.1f} | "
                     f"{r['first_batch_s']:.2f} | {r['loader_images_per_s']:.0f} | {r['loader_cpu_ms_per_image']:.2f} | "
                     f"{r['train_images_per_s']:.0f} | {r['train_cpu_s_per_step']:.2f} | "
                     f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {worker_rss} | {r['peak_tree_pss_mib']:.0f} |")
    for n, r in sorted(results.get("index", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"\nIndex of {int(n):,} images: {r['index_mib']:.1f} MiB of Python objects held "
                     f"({1024 * r['index_mib'] / int(n):.2f} KiB per image), {r['indexing_peak_mib']:.1f} MiB at the peak "
                     "of indexing.")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        from diffusekit.data import write_shapes_folder
        write_shapes_folder(sys.argv[2], int(sys.argv[3]))
        print("ok")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "index":
        print(json.dumps(index_memory(sys.argv[2])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        folder, mode, workers, batch, loader_steps, train_steps, run_dir = sys.argv[2:9]
        print(json.dumps(measure(folder, mode, int(workers), int(batch), int(loader_steps), int(train_steps),
                                 run_dir)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="where the generated image folders go (outside the repository)")
    p.add_argument("--out", type=Path, default=Path("out/data_memory.json"), help="results JSON")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-steps", type=int, default=40)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--paths", nargs="*", default=[f"{m}:{w}" for m, w in PATHS],
                   help="MODE:WORKERS to measure (memory:0, stream:0, stream:1, stream:2)")
    p.add_argument("--append", action="store_true", help="keep the rows already in --out (re-measured ones replaced)")
    p.add_argument("--report", type=Path, help="print the markdown table of a results JSON and exit")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    if args.data_dir is None:
        p.error("--data-dir is required (a folder outside the repository, e.g. /tmp/diffusekit-data)")
    results = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": []}
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        results["rows"], results["index"] = old["rows"], old.get("index", {})
        results["machine"]["load_average_earlier"] = old["machine"]["load_average"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        folder = ensure_folder(args.data_dir, n)
        results.setdefault("index", {})[str(n)] = json.loads(child("index", str(folder)))
        for mode, workers in (path.split(":") for path in args.paths):
            run_dir = args.data_dir / "runs" / f"{n}-{mode}-w{workers}-{time.time_ns()}"
            row = json.loads(child("measure", str(folder), mode, workers, str(args.batch_size),
                                   str(args.loader_steps), str(args.train_steps), str(run_dir)))
            same = (row["folder_images"], row["mode"], row["workers"])
            results["rows"] = [r for r in results["rows"] if (r["folder_images"], r["mode"], r["workers"]) != same]
            results["rows"].append(row)
            results["rows"].sort(key=lambda r: (r["folder_images"], r["mode"] != "memory", r["workers"]))
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
