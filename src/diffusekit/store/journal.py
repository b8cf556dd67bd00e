"""The save journal: a run's checkpoint replaced as one set, atomically, by its one writer.

Layout (DESIGN.md, "Run directory"):
  config.json            the resolved run config (written by the caller as JSON text)
  model.safetensors      EMA weights, metadata {"step": "N", "weights": "ema", ...}
  model_raw.safetensors  raw (optimised) weights, same metadata with "weights": "raw"
  trainer_state.pt       {"step": N, optimizer state, ...}: plain tensors/lists/dicts, read weights_only
  .lock                  the writer's lock file (store.lock), holding the writer's pid

One writer. Whatever writes a run holds its `RunLock` (the trainer: `with RunLock(run_dir):` around
the whole run). `save_checkpoint` and `recover` use the lock this process holds on the run, or take
it for the call, and raise RunLockedError ("RUN is being trained by process N; ...") while another
process holds it. The kernel drops the lock of a process that dies, so kill -9 leaves no stale lock.

Atomic saves: a small journal. A save writes every file into `ckpt.tmp/` and fsyncs it, then renames
that folder to `ckpt.ready/` (the commit point: one atomic rename, after which the new set is
complete), then moves the files one by one into the run directory, trainer_state.pt last, and
removes the empty folder. `recover` (only ever under the lock) deletes a leftover `ckpt.tmp/` (an
unfinished save; the old set is untouched) and moves in what is left of a `ckpt.ready/` (roll
forward). So a kill at any moment leaves either the previous checkpoint or the new one, never a mix.
Files are only ever replaced whole (os.replace), never modified in place.

Readers (store.readers) never write: they read the committed set as this journal defines it.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import files
from .files import write_error
from .lock import RunLock, RunLockedError, writer

CONFIG_FILE = "config.json"
EMA_FILE = "model.safetensors"
RAW_FILE = "model_raw.safetensors"
STATE_FILE = "trainer_state.pt"
TMP_DIR = "ckpt.tmp"          # a save in progress: incomplete, discarded by recover()
READY_DIR = "ckpt.ready"      # a complete save being moved into place: finished by recover()
COMMIT_ORDER = (CONFIG_FILE, EMA_FILE, RAW_FILE, STATE_FILE)   # trainer_state.pt last
WHAT = {CONFIG_FILE: "the run's settings", EMA_FILE: "EMA weights", RAW_FILE: "raw weights",
        STATE_FILE: "optimizer, step and RNG state for resuming"}


def save_checkpoint(run_dir: str | Path, step: int, *, ema: dict[str, torch.Tensor],
                    raw: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                    config_json: str | None = None, metadata: dict[str, str] | None = None,
                    lock: RunLock | None = None) -> Path:
    """Atomically replace the run's checkpoint with the given weights and state at `step`.

    ema/raw are state dicts; trainer_state must hold only tensors, numbers, strings, lists and
    dicts (it is read back with weights_only=True); its "step" is set to `step`. metadata (str to
    str) is stored in both safetensors headers beside "step", "weights" and the content hash.
    Runs under `lock`, or the RunLock this process holds, or one taken for the call. An OSError
    becomes CheckpointWriteError and leaves the previous checkpoint as it was. Returns run_dir.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, run_dir, f"cannot create the run folder {run_dir}") from e
    with writer(run_dir, lock):
        _recover(run_dir)
        tmp = run_dir / TMP_DIR
        try:
            tmp.mkdir()
            _write_set(tmp, step, ema, raw, trainer_state, config_json, metadata or {})
            # the commit point: after this rename the new set is complete and recover() rolls it forward
            os.replace(tmp, run_dir / READY_DIR)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                kept = "the previous checkpoint there is intact; " if (run_dir / STATE_FILE).exists() else \
                    "no checkpoint had been saved there yet; "
                raise write_error(e, tmp, f"could not save step {step} in {run_dir}", kept) from e
            raise
        files.fsync_dir(run_dir)
        try:
            _move_ready(run_dir)
        except OSError as e:
            raise write_error(e, run_dir / READY_DIR, f"the save of step {step} is complete in "
                               f"{run_dir / READY_DIR} but could not be moved into {run_dir}",
                               "the next save or resume finishes the move; ") from e
    return run_dir


def _write_set(tmp: Path, step: int, ema, raw, trainer_state, config_json, metadata) -> None:
    meta = {**metadata, "step": str(int(step))}
    files.save_weights(tmp / EMA_FILE, ema, {**meta, "weights": "ema"})
    files.save_weights(tmp / RAW_FILE, raw, {**meta, "weights": "raw"})
    if config_json is not None:
        files.write_bytes(tmp / CONFIG_FILE, config_json.encode())
    buffer = io.BytesIO()
    torch.save({**trainer_state, "step": int(step)}, buffer)
    files.write_bytes(tmp / STATE_FILE, buffer.getvalue())
    files.fsync_dir(tmp)


def _move_ready(run_dir: Path) -> None:
    ready = run_dir / READY_DIR
    for name in COMMIT_ORDER:
        if (ready / name).exists():
            os.replace(ready / name, run_dir / name)
    files.fsync_dir(run_dir)
    ready.rmdir()


def _recover(run_dir: Path) -> str | None:
    action = None
    try:
        if (run_dir / READY_DIR).is_dir():
            _move_ready(run_dir)
            action = "rolled_forward"
        if (run_dir / TMP_DIR).exists():
            shutil.rmtree(run_dir / TMP_DIR)
            action = action or "discarded"
    except OSError as e:
        raise write_error(e, run_dir, f"cannot finish the interrupted save in {run_dir}") from e
    return action


def recover(run_dir: str | Path, lock: RunLock | None = None) -> str | None:
    """Finish or discard an interrupted save; returns "rolled_forward", "discarded" or None.

    Only the run's writer recovers: pass the RunLock you hold on run_dir, or hold one in this
    process; otherwise the lock is taken for the call, and RunLockedError says which process
    holds it instead. Readers never call this (see read_checkpoint).
    """
    run_dir = Path(run_dir)
    if lock is None and not run_dir.is_dir():
        return None
    with writer(run_dir, lock):
        return _recover(run_dir)


def recover_if_free(run_dir: Path) -> None:
    """recover() when there is something to recover and no other process writes the run; else nothing."""
    if not ((run_dir / READY_DIR).exists() or (run_dir / TMP_DIR).exists()):
        return
    try:
        recover(run_dir)
    except (RunLockedError, OSError):
        pass        # a trainer owns the run, or the folder is read-only: read the committed set as it is

