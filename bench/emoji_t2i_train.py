"""Training for bench/text_to_image_emoji.py: the autoencoder, and ONE diffusion run snapshotted per CPU-minute.

`ladder(folder, options, marks)` trains one run (constant learning rate after the warm-up, EMA) and, when
its training CPU time (time.process_time of this process, one thread) passes each mark, saves the run and
copies it (weights, EMA, config, autoencoder: a folder Pipeline.load opens) to folder/snapshots/MIN/.
It stops after the last mark; a later call with more marks resumes the run where it stopped (the CPU time
of every call is summed from folder/bench_time.json), so a 30-minute ladder extends to 60.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from diffusekit.data import DataConfig, load_dataset
from diffusekit.training import diffusion, skeleton
from diffusekit.training.autoencoder import autoencoder_run_config, train_autoencoder
from diffusekit.training.resolve import resolve_run_config
# the bench folder is on sys.path (every caller puts it there): one CPU-time record for every benchmark
from text_to_image import TIME_FILE, _finished_autoencoder, saved_step, time_record, timed  # noqa: E402

SNAPSHOTS = "snapshots"


# ---------------------------------------------------------------------------------------------
# the autoencoder


def autoencoder(folder: Path, source: str, size: int, steps: int, batch_size: int, ae: dict) -> dict:
    """Train (or reuse) a KL autoencoder on the folder `source` at size x size (white background)."""
    data_cfg = DataConfig(source=source, image_size=size, alpha_background="white", class_labels=False)
    if not _finished_autoencoder(folder):
        dataset = load_dataset(data_cfg)
        cfg = autoencoder_run_config(getattr(dataset, "config", None) or data_cfg, dataset, autoencoder=ae,
                                     steps=steps, batch_size=batch_size, precision="bf16", device="cpu",
                                     save_every=min(steps, 1000), log_every=100)
        timed(folder, "train-autoencoder", lambda: train_autoencoder(cfg, folder, resume=True, progress=False,
                                                                      dataset=dataset), steps=steps)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    psnr = [m for m in metrics if "heldout_psnr" in m][-1]
    return {"heldout_psnr_db": psnr["heldout_psnr"], "step": psnr["step"], **time_record(folder)}


# ---------------------------------------------------------------------------------------------
# one run, snapshotted per CPU-minute


class _LadderDone(Exception):
    """Raised by the snapshot hook after the last mark: ends the training loop (the run is saved)."""


def _ladder_trainer(marks: list[float], cpu_before: float, snap_dir: Path, log: list):
    """A DiffusionTrainer subclass whose per-step hook snapshots the run at each CPU-minute mark, counting
    this process's CPU time from now (the train call: latents, network, steps) plus cpu_before."""
    pending, t0 = sorted(marks), time.process_time()

    class LadderTrainer(diffusion.DiffusionTrainer):
        def periodic(self, run):
            hooks = super().periodic(run)

            def check(step: int) -> None:
                cpu = cpu_before + time.process_time() - t0
                if not pending or cpu < pending[0] * 60:
                    return
                skeleton.save(self, run, step)
                while pending and cpu >= pending[0] * 60:
                    mark = pending.pop(0)
                    copy_run(run.run_dir, snap_dir / f"{mark:g}")
                    log.append({"mark_min": mark, "step": step, "cpu_s": cpu})
                if not pending:
                    raise _LadderDone
            return [*hooks, (1, check)]
    return LadderTrainer


def copy_run(run_dir: Path, dest: Path) -> None:
    """A loadable copy of a run folder: everything but checkpoint-STEP/ folders, latent caches and the lock."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoint-*", "latents-*", ".lock", "*.tmp",
                                                                 SNAPSHOTS, TIME_FILE))


def ladder(folder: Path, options: dict, marks: list[float], max_steps: int = 10 ** 6) -> dict:
    """Train the run `options` describe in folder until its training CPU time passes every mark (minutes),
    snapshotting at each; reuses snapshots already taken and resumes a run that stopped at an earlier mark."""
    folder = Path(folder)
    log_path = folder / "ladder.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    todo = [m for m in marks if not (folder / SNAPSHOTS / f"{m:g}").exists()]
    if todo:
        options = {"train.steps": max_steps, "train.precision": "bf16", "train.device": "cpu",
                   "train.sample_every": 0, "train.save_every": max_steps, "train.log_every": 50,
                   "train.lr_schedule": "constant", "train.checkpoints_total_limit": 1, **options}
        cfg, data = resolve_run_config(options)
        done = saved_step(folder)
        cpu_before = time_record(folder)["cpu_s"] if done else 0.0
        trainer = _ladder_trainer(todo, cpu_before, folder / SNAPSHOTS, log)
        original = diffusion.DiffusionTrainer
        diffusion.DiffusionTrainer = trainer      # diffusion.train builds its trainer by this name
        try:
            timed(folder, "train", lambda: _fit(cfg, folder, done > 0, data), steps_from=done, marks=todo)
            left = [m for m in marks if not (folder / SNAPSHOTS / f"{m:g}").exists()]
            _snapshot_finished(folder, cfg.train.steps, bool(left), log)
        finally:
            diffusion.DiffusionTrainer = original
            log_path.write_text(json.dumps(log, indent=2) + "\n")
    return {"snapshots": log, **time_record(folder)}


def _snapshot_finished(folder: Path, steps: int, marks_left: bool, log: list) -> None:
    """A run whose schedule (train.steps, e.g. a cosine decay) ended before its last mark is snapshotted
    at the CPU-minutes it took (snapshots/MIN, one decimal), so it is scored like every snapshot."""
    if not marks_left or saved_step(folder) < steps:
        return
    cpu = time_record(folder)["cpu_s"]
    copy_run(folder, folder / SNAPSHOTS / f"{cpu / 60:.1f}")
    log.append({"mark_min": round(cpu / 60, 1), "step": steps, "cpu_s": cpu, "schedule_ended": True})


def _fit(cfg, folder: Path, resume: bool, data) -> None:
    try:
        diffusion.train(cfg, folder, resume=resume, progress=False, dataset=data)
    except _LadderDone:
        pass


def step_cpu_seconds(folder: Path) -> float:
    """Training CPU seconds per step of a ladder run, from its log (the last snapshot)."""
    log = json.loads((folder / "ladder.json").read_text())
    return log[-1]["cpu_s"] / log[-1]["step"]
