"""The one training skeleton: open the run, build, run the steps with hooks, save through the journal.

Every trainer (diffusion.py, autoencoder.py, classifier.py, finetune.py) runs `fit(trainer, ...)`. The
trainer supplies what is its own (a `Trainer`): its network, its step function (the loss and the optimiser
step), what its saves add (an evaluation, pictures, a model card) and its weights' metadata, and where it
differs from training a whole network, what the optimiser steps and what a save holds (`parameters`,
`weights`, `load_weights`, `config_json`: a LoRA fine-tune steps and saves only its adapter), and what
it adds to the trainer state (`state`, `load_state`: the autoencoder's discriminator). The
skeleton does the rest, once:
  join     the torchrun process group (`processes`: training.processes.setup_processes), left at the end
  open     the run folder under its RunLock (rank 0): finish an interrupted save (store.journal),
           refuse a checkpoint unless resuming, refuse a resume whose settings changed or whose step
           differs between ranks
  build    the network (seeded), its EMA, AdamW and a grad scaler; restored from the checkpoint; under
           torchrun `run.net` is the network in DistributedDataParallel (what the step calls)
  loop     training.loop.run_loop: per-step seeds and learning rate, divergence stop, progress
  hooks    the logging window (metrics.jsonl, TensorBoard), the trainer's periodic hooks, saves
  save     store.save_checkpoint (EMA + raw weights, trainer state, config.json as one set), then
           the checkpoint-STEP/ snapshot where the trainer keeps history, and the loss plot
Rank 0 writes; every rank saves in step (a barrier), so torchrun runs stay in lockstep. A trainer's step
draws for the GLOBAL batch from (seed, step) and feeds the model this rank's rows (Dist.rows), so k
processes train what one process trains at the same batch size, up to float reduction order.
"""
from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from diffusekit import store
from diffusekit.config import ConfigError
from diffusekit.device import grad_scaler
from diffusekit.seeding import derive_seed
from diffusekit.store.manifest import check_apart, note_written, run_entries_present
from diffusekit.training.ema import EMA
from diffusekit.training.loop import run_loop
from diffusekit.training.processes import Dist, setup_processes
from diffusekit.training.tracking import Tracker
from diffusekit.viz import plot_loss


class Trainer(ABC):
    """What a trainer plugs into the skeleton; subclasses set `cfg`, implement the three abstract methods and
    override the other hooks where they need to."""

    desc = "train"                              # the progress bar's label
    window_keys: tuple[str, ...] = ("loss",)    # numbers averaged over a logging window (others: last value)
    resumable: tuple[str, ...] = ()             # config fields that may change on resume
    config_on_resume = True                     # rewrite config.json when a resume opens the run
    cfg: Any                                    # the run config: .train (a TrainConfig), .to_json(), .diff()

    @abstractmethod
    def read_config(self, folder: Path):
        """The run config saved in folder (for the resume check)."""

    @abstractmethod
    def make_model(self, device: torch.device) -> torch.nn.Module:
        """The network, built after the skeleton seeds (seed, "init")."""

    @abstractmethod
    def step_fn(self, run: "Run") -> Callable[[int, torch.Generator], dict]:
        """step(step, generator) -> {"loss": float, ...}: one optimisation step."""

    def metadata(self) -> dict[str, str]:
        """What the weights record about their meaning (checked when they are loaded)."""
        return {}

    def parameters(self, model: torch.nn.Module):
        """What the optimiser steps (a LoRA fine-tune: the adapter's parameters only)."""
        return model.parameters()

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a save writes of the model (and of its EMA): by default its whole state dict."""
        return model.state_dict()

    def load_weights(self, model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore what `weights` wrote (on resume)."""
        store.load_state_dict_checked(model, state, where)

    def state(self, run: "Run") -> dict[str, Any]:
        """What the trainer adds to trainer_state.pt beyond the skeleton's (tensors, numbers, strings, lists,
        dicts: it is read weights_only), e.g. a discriminator and its optimiser."""
        return {}

    def load_state(self, run: "Run", state: dict[str, Any], where: str) -> None:
        """Restore what `state` wrote (on resume), from the trainer state read in `where`."""

    def config_json(self) -> str:
        """config.json's text (a full fine-tune writes its base's run config there, so Pipeline.load reads it)."""
        return self.cfg.to_json()

    def periodic(self, run: "Run") -> list[tuple[int, Callable[[int], None]]]:
        """(every, fn(step)) hooks that run every N steps and at the last (rank 0), e.g. sample grids."""
        return []

    def before_save(self, run: "Run", step: int, last: bool) -> None:
        """Evaluate (and record) before the weights of `step` are saved; the final save has last=True."""

    def after_save(self, run: "Run", step: int) -> None:
        """Write what describes the saved weights (rank 0), e.g. a model card."""


@dataclass
class Run:
    """One open run: its folder, processes, network, EMA, optimiser and where it starts."""

    run_dir: Path
    dist: Dist
    device: torch.device
    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    scaler: Any
    start: int
    elapsed_before: float
    state: dict | None                          # the trainer state resumed from, or None
    net: torch.nn.Module | None = None          # what the step calls: model, in DDP under torchrun
    ema_metadata: dict[str, str] = field(default_factory=dict)   # of the resumed EMA weights
    tracker: Tracker | None = None              # rank 0 only
    batches_per_epoch: int = 1
    saved_step: int | None = None
    last_loss: float | None = None
    t_start: float = field(default_factory=time.time)

    @property
    def rank0(self) -> bool:
        return self.dist.rank == 0

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start


# ---------------------------------------------------------------------------------------------
# open and build


def create_folder(run_dir: Path, data_source=None, dist: Dist | None = None) -> None:
    """Refuse a run folder that is, holds or lies inside the training data (every rank), then mkdir -p
    (rank 0), with an error that names the path, the reason and the fix (store.os_error_line)."""
    check_apart(run_dir, data_source)       # never train into (or around) the training data
    if dist is not None and dist.rank != 0:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = store.CheckpointWriteError(f"cannot create the run folder {run_dir}: {store.os_error_line(e)}")
        err.errno = e.errno
        raise err from e


@contextmanager
def processes(run_dir: Path, data_source, device: str | None) -> Iterator[tuple[Dist, torch.device]]:
    """Where every trainer runs: (dist, device) in the torchrun process group (joined here, left after), the run
    folder checked and created (create_folder), its lock held by rank 0 and the caller's RNG state kept (locked)."""
    dist, torch_device = setup_processes(device or "auto")
    try:
        create_folder(run_dir, data_source, dist)
        with locked(run_dir, dist, torch_device):
            yield dist, torch_device
    finally:
        dist.close()


@contextmanager
def locked(run_dir: Path, dist: Dist, device: torch.device) -> Iterator[None]:
    """The context a run trains in: the caller's RNG state kept, and the run's lock held by rank 0."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), (store.RunLock(run_dir) if dist.rank == 0 else nullcontext()):
        yield


def open_run(trainer: Trainer, run_dir: Path, resume: bool, dist: Dist, folder: Path) -> dict | None:
    """The trainer state to resume from (read from `folder`: the run or a checkpoint-STEP/ folder), or None.

    Refuses a folder that holds a checkpoint unless resuming, and a resume whose settings changed
    beyond trainer.resumable.
    """
    if dist.rank == 0:
        create_folder(run_dir)
        store.recover(run_dir)
    dist.barrier()
    has_state = (run_dir / store.STATE_FILE).exists()
    state = _resumed_state(trainer, run_dir, resume, folder) if has_state else None
    dist.same_step(run_dir, None if state is None else state["step"])
    return state


def _resumed_state(trainer: Trainer, run_dir: Path, resume: bool, folder: Path) -> dict:
    if not resume:
        step = store.read_trainer_state(run_dir, finish_interrupted=False)["step"]
        raise store.CheckpointError(f"{run_dir} already holds a checkpoint at step {step}; pass resume=True "
                                    f"(--resume) to continue it, or choose a new output folder.")
    diff = {k: v for k, v in trainer.read_config(folder).diff(trainer.cfg).items() if k not in trainer.resumable}
    if diff:
        lines = "\n  ".join(f"{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {run_dir} with a different config; these fields differ:\n  {lines}\n"
                          f"Use the checkpoint's {store.CONFIG_FILE}, or start a new run (only "
                          f"{', '.join(trainer.resumable)} may change on resume).")
    return store.read_trainer_state(folder, finish_interrupted=False)


def build(trainer: Trainer, run_dir: Path, dist: Dist, device: torch.device, folder: Path,
          state: dict | None) -> Run:
    """Network, EMA, optimiser and grad scaler, identical on every rank; restored when resuming."""
    tc = trainer.cfg.train
    torch.manual_seed(derive_seed(tc.seed, "init"))
    model = trainer.make_model(device)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(trainer.parameters(model), lr=tc.lr, weight_decay=tc.weight_decay)
    run = Run(run_dir, dist, device, model, ema, opt, grad_scaler(device, tc.precision), 0, 0.0, state)
    if state is not None:
        trainer.load_weights(model, store.read_weights(folder / store.RAW_FILE)[0], str(folder))
        ema_weights, run.ema_metadata = store.read_weights(folder / store.EMA_FILE)
        trainer.load_weights(ema.model, ema_weights, str(folder))
        opt.load_state_dict(state["optimizer"])
        ema.num_updates, run.start, run.elapsed_before = state["ema_num_updates"], state["step"], state["elapsed"]
        run.saved_step = run.start
        trainer.load_state(run, state, str(folder / store.STATE_FILE))
    run.net = dist.wrap(model, device)      # after the weights are set: DDP copies rank 0's to the others
    return run


# ---------------------------------------------------------------------------------------------
# the loop, its hooks and the save


def fit(trainer: Trainer, run: Run, progress: bool = True) -> Run:
    """Run the steps from run.start to train.steps with the skeleton's hooks; the caller closes nothing."""
    tc = trainer.cfg.train
    if run.rank0:
        if run.state is None or trainer.config_on_resume:
            store.write_text_atomic(run.run_dir / store.CONFIG_FILE, trainer.config_json() + "\n")
        run.tracker = Tracker(run.run_dir, run.start, getattr(tc, "report_to", "none"),
                              config=json.loads(trainer.config_json()))
    hooks = Hooks(trainer, run)
    run.model.train()
    try:
        run_loop(trainer.step_fn(run), start=run.start, total=tc.steps, seed=tc.seed, dist=run.dist,
                 device=run.device, opt=run.opt, lr_config=tc, on_step=hooks,
                 last_checkpoint=lambda: (run.run_dir, run.saved_step), progress=progress, desc=trainer.desc)
    finally:
        if run.tracker is not None:
            run.tracker.close()
    return run


class Hooks:
    """After each step: the logging window, the trainer's periodic hooks (rank 0), and the saves."""

    def __init__(self, trainer: Trainer, run: Run):
        self.trainer, self.run, self.tc = trainer, run, trainer.cfg.train
        self.periodic = trainer.periodic(run) if run.rank0 else []
        self.window: dict[str, float] = {}
        self.counts: dict[str, int] = {}        # steps that reported each key (a GAN term starts mid-window)
        self.window_steps, self.t_window = 0, time.time()

    def __call__(self, step: int, numbers: dict) -> None:
        tc, last = self.tc, step == self.tc.steps
        for key in self.trainer.window_keys:
            if key in numbers:
                self.window[key] = self.window.get(key, 0.0) + numbers[key]
                self.counts[key] = self.counts.get(key, 0) + 1
        self.window_steps += 1
        if step % tc.log_every == 0 or last:
            self.log(step, numbers)
        for every, fn in self.periodic:
            if every and (step % every == 0 or last):
                fn(step)
        if step % tc.save_every == 0 or last:
            save(self.trainer, self.run, step, last)

    def log(self, step: int, numbers: dict) -> None:
        now = time.time()
        means = {k: v / self.counts[k] for k, v in self.window.items()}
        self.run.last_loss = means["loss"]
        rest = {k: v for k, v in numbers.items() if k not in means}
        rest = {**({"lr": rest.pop("lr")} if "lr" in rest else {}), **rest}
        if self.run.tracker is not None:
            self.run.tracker.log(step, {**means, **rest, "time": self.run.elapsed(), "images_per_s":
                                        self.window_steps * self.tc.batch_size / max(now - self.t_window, 1e-9)})
        self.window, self.counts, self.window_steps, self.t_window = {}, {}, 0, now


def save(trainer: Trainer, run: Run, step: int, last: bool = False) -> None:
    """One journaled save of the run at `step` (rank 0 writes; every rank waits for it)."""
    trainer.before_save(run, step, last)
    if run.rank0:
        tc, per_epoch = trainer.cfg.train, run.batches_per_epoch
        trainer_state = {"optimizer": run.opt.state_dict(), "ema_num_updates": run.ema.num_updates,
                         "elapsed": run.elapsed(), "seed": tc.seed, "world_size": run.dist.world_size,
                         "data_order": {"epoch": step // per_epoch, "batches_per_epoch": per_epoch},
                         **trainer.state(run)}
        store.save_checkpoint(run.run_dir, step, ema=trainer.weights(run.ema.model), raw=trainer.weights(run.model),
                              trainer_state=trainer_state, config_json=trainer.config_json() + "\n",
                              metadata=trainer.metadata())
        if getattr(tc, "checkpoints_total_limit", None) is not None:
            # checkpoint-STEP/ (hard links to the files just saved), the newest checkpoints_total_limit kept
            store.snapshot_checkpoint(run.run_dir, step, tc.checkpoints_total_limit)
        plot_logged_loss(run.run_dir)
        trainer.after_save(run, step)
        # what this run wrote, so that --overwrite deletes exactly that (store/manifest.py)
        note_written(run.run_dir, run_entries_present(run.run_dir))
    run.saved_step = step
    run.dist.barrier()


def plot_logged_loss(run_dir: Path) -> None:
    """loss.png from metrics.jsonl, once a loss has been logged."""
    path = run_dir / "metrics.jsonl"
    if path.exists() and any("loss" in json.loads(line) for line in path.read_text().splitlines() if line.strip()):
        plot_loss(path, run_dir / "loss.png")
