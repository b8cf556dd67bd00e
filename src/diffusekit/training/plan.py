"""Before a diffusion run trains: the resolved config, and what --resume / --overwrite mean for the folder.

`plan_run` is what `diffusekit train` calls (and any program that wants the command's behaviour):
it resolves the options into a RunConfig, refuses an output folder that overlaps the data, clears
what diffusekit wrote on `overwrite`, and checks a resume (settings unchanged, the saved step not past
the requested length). The trainer itself repeats none of this; `RunPlan.train` starts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store as ckpt
from ..config import ConfigError
from ..store.manifest import check_apart


@dataclass
class RunPlan:
    run_dir: Path
    config: Any                         # the resolved RunConfig
    dataset: Any = None                 # the data, already opened (None when resuming from a config)
    resume_from: str | None = None      # "latest", a step, or a checkpoint folder; None = a new run
    finished: bool = False              # resuming a run that has already trained config.train.steps
    notes: list[str] = field(default_factory=list)     # what loading and device choice did, for the CLI

    def train(self, progress: bool = True):
        """Train as planned; returns the trainer's result."""
        from .diffusion import train
        return train(self.config, self.run_dir, resume=bool(self.resume_from), progress=progress,
                     dataset=self.dataset, resume_from=self.resume_from)


def saved_step(run_dir: str | Path, resume_from: str | int | None) -> int | None:
    """The step of the checkpoint a resume would continue, or None (no resume, or nothing saved)."""
    if not resume_from or not ckpt.has_checkpoint(run_dir):
        return None
    return ckpt.read_trainer_state(ckpt.resume_folder(run_dir, resume_from), finish_interrupted=False)["step"]


def check_resume_length(run_dir: str | Path, resume_from, steps: int) -> bool:
    """True when the run has already trained `steps`; refuses a length below the saved step."""
    saved = saved_step(run_dir, resume_from)
    if saved is not None and saved > steps:
        raise ConfigError(f"--train-steps {steps} is below step {saved}, which {run_dir} has already reached; give "
                          f"--train-steps above {saved} to train further, or leave it out (the run is unchanged).")
    return saved is not None and saved >= steps


def _base_config(run_dir: Path, config_path, resume):
    from ..store.run_config import read_config_file, read_run_config
    if resume:
        if not (run_dir / ckpt.CONFIG_FILE).exists():
            raise ConfigError(f"--resume: {run_dir} has no {ckpt.CONFIG_FILE}, so there is no run to continue; drop "
                              f"--resume to start one there, or point --out at an existing run.")
        return read_run_config(run_dir)
    return read_config_file(config_path) if config_path else None


def _check_resume_settings(run_dir: Path, base, cfg) -> None:
    from ..store.run_config import resume_conflicts
    conflicts = resume_conflicts(base, cfg)
    if conflicts:
        lines = "; ".join(f"{k}: the run has {a!r}, the command line says {b!r}" for k, (a, b) in conflicts.items())
        raise ConfigError(f"--resume keeps the run's settings, but {lines}. Drop those options, or train a new "
                          f"run with --config {run_dir / ckpt.CONFIG_FILE} --out NEW.")


def _notes(cfg, dataset) -> list[str]:
    from ..device import resolve_device, resolve_precision
    device = resolve_device(cfg.train.device)
    auto = " (auto)" if cfg.train.precision == "auto" else ""
    return [*(f"data: {n}" for n in getattr(dataset, "notes", None) or []),
            f"device: {device}, precision {resolve_precision(cfg.train.precision, device)}{auto}"]


def plan_run(out_dir: str | Path, options: dict[str, Any] | None = None, *, config_path=None,
             resume: str | None = None, overwrite: bool = False, preset: str | None = None,
             dry_run: bool = False) -> RunPlan:
    """The run `diffusekit train` would start in out_dir, checked; `overwrite` clears the folder (not on dry_run).

    options: dotted config fields ({"train.lr": 1e-3, ...}); on `resume` they apply on top of the run's
    own config and may only change what resuming allows."""
    from .resolve import resolve_run_config
    from ..store.manifest import clear_run
    run_dir = Path(out_dir)
    if overwrite and resume:
        raise ConfigError("--overwrite starts afresh and --resume continues; give one of them.")
    base = _base_config(run_dir, config_path, resume)
    cfg, dataset = resolve_run_config(options or {}, base=base, preset=preset)
    check_apart(run_dir, cfg.data.source)
    if resume:
        _check_resume_settings(run_dir, base, cfg)
    if dry_run:
        return RunPlan(run_dir, cfg, dataset, resume)
    if overwrite:
        clear_run(run_dir)
    finished = bool(resume) and check_resume_length(run_dir, resume, cfg.train.steps)
    return RunPlan(run_dir, cfg, dataset, resume, finished, [] if finished else _notes(cfg, dataset))


# downsampling factor -> the laptop autoencoder's channel multipliers (one halving per level after the first)
AUTOENCODER_CHANNEL_MULT = {4: (1, 2, 2), 8: (1, 2, 2, 4)}


def plan_autoencoder_run(out_dir: str | Path, data: dict[str, Any], autoencoder: dict[str, Any],
                         train: dict[str, Any], *, factor: int = 4, resume: bool = False):
    """(AutoencoderRunConfig, the data or None, resuming): what `train-autoencoder` trains in out_dir.

    factor: 4 or 8 (32x32 images -> 8x8 or 4x4 latents). Resuming a folder with a config keeps its
    settings; only train["steps"] (the length) applies."""
    from dataclasses import replace

    from ..store.autoencoder import read_autoencoder_config
    from .autoencoder import autoencoder_run_config
    from ..data import DataConfig, load_dataset
    if resume and (Path(out_dir) / ckpt.CONFIG_FILE).exists():
        cfg = read_autoencoder_config(out_dir)
        if train.get("steps"):
            cfg = replace(cfg, train=replace(cfg.train, steps=train["steps"]))
        return cfg, None, True
    check_apart(out_dir, data.get("source"))
    data_cfg = DataConfig(**data)
    dataset = load_dataset(data_cfg)
    if factor not in AUTOENCODER_CHANNEL_MULT:
        raise ConfigError(f"factor={factor}; the autoencoder downsamples by 4 or 8.")
    autoencoder = {"channel_mult": AUTOENCODER_CHANNEL_MULT[factor], **autoencoder}
    return autoencoder_run_config(getattr(dataset, "config", None) or data_cfg, dataset, autoencoder, **train), \
        dataset, False


@dataclass
class ClassifierPlan:
    data: Any           # DataConfig
    classifier: Any     # ClassifierConfig
    train: Any          # ClassifierTrainConfig


def plan_classifier_run(run_dir: str | Path, source: str, *, image_size: int = 0, channels: int = 1, from_run=None,
                        base_channels: int = 16, features: str = "levels", **train: Any) -> ClassifierPlan:
    """The configs `train-classifier` trains with in run_dir: the data's shape and classes, or (from_run) the
    diffusion run's image size, channels and noise schedule, so the classifier guides that run."""
    from ..store.classifier import ClassifierTrainConfig, default_classifier_config
    from ..data import DataConfig, load_dataset
    from ..schedule import ScheduleConfig
    schedule = ScheduleConfig()
    if from_run:
        from ..store.run_config import read_run_config
        run_cfg = read_run_config(from_run)
        schedule, image_size, channels = run_cfg.schedule, run_cfg.model.image_size, run_cfg.model.in_channels
    check_apart(run_dir, source)
    data_cfg = DataConfig(source=source, image_size=image_size, channels=channels)
    train_cfg = ClassifierTrainConfig(schedule=schedule, **train)
    dataset = load_dataset(data_cfg)
    if dataset.labels is None:
        raise ConfigError(f"{source} has no labels; a classifier needs class sub-folders, IDX labels "
                          f"or 'labels' in the .npz.")
    classifier_cfg = default_classifier_config(dataset.image_size, dataset.channels, dataset.num_classes,
                                               base_channels=base_channels, groups=min(8, base_channels),
                                               features=features)
    return ClassifierPlan(data_cfg, classifier_cfg, train_cfg)
