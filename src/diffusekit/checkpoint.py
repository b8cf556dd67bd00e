"""A run directory on disk: config.json, EMA and raw weights, trainer state; atomic saves, checked loads.

Layout (DESIGN.md, "Run directory"):
  config.json            the resolved run config (written by the caller as JSON text)
  model.safetensors      EMA weights, metadata {"step": "N", "weights": "ema", ...}
  model_raw.safetensors  raw (optimised) weights, same metadata with "weights": "raw"
  trainer_state.pt       {"step": N, optimizer state, ...}: plain tensors/lists/dicts, read weights_only

Atomicity is a small journal. A save writes every file into `ckpt.tmp/` and fsyncs it, then
renames that folder to `ckpt.ready/` (one atomic rename: from here on the new set is complete),
then moves the files one by one into the run directory, trainer_state.pt last, and removes the
empty folder. Whoever opens the run next calls `recover`: a leftover `ckpt.tmp/` is an
unfinished save and is deleted (the old set is untouched); a leftover `ckpt.ready/` is a finished
save whose moves were cut short, and its remaining files are moved in (roll forward). So a kill
at any moment leaves either the previous checkpoint or the new one, never a mix, and readers
still verify that the weights' step metadata equals trainer_state's step.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
EMA_FILE = "model.safetensors"
RAW_FILE = "model_raw.safetensors"
STATE_FILE = "trainer_state.pt"
TMP_DIR = "ckpt.tmp"          # a save in progress: incomplete, discarded by recover()
READY_DIR = "ckpt.ready"      # a complete save being moved into place: finished by recover()
COMMIT_ORDER = (CONFIG_FILE, EMA_FILE, RAW_FILE, STATE_FILE)   # trainer_state.pt last


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:          # some platforms cannot open directories; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to path through a temporary file and os.replace, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    return path


def write_weights_atomic(path: str | Path, state_dict: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> Path:
    """Write one safetensors file through a temporary file and os.replace (never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_cpu_contiguous(state_dict), str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)
    return path


def _cpu_contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that share no memory; channels_last weights are not contiguous
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def save_checkpoint(run_dir: str | Path, step: int, *, ema: dict[str, torch.Tensor],
                    raw: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                    config_json: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Atomically replace the run's checkpoint with the given weights and state at `step`.

    ema/raw are state dicts; trainer_state must hold only tensors, numbers, strings, lists and
    dicts (it is read back with weights_only=True); its "step" is set to `step`. metadata (str to
    str) is stored in both safetensors headers. Returns the run directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recover(run_dir)
    tmp = run_dir / TMP_DIR
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {**(metadata or {}), "step": str(int(step))}
    save_file(_cpu_contiguous(ema), str(tmp / EMA_FILE), metadata={**meta, "weights": "ema"})
    save_file(_cpu_contiguous(raw), str(tmp / RAW_FILE), metadata={**meta, "weights": "raw"})
    if config_json is not None:
        (tmp / CONFIG_FILE).write_text(config_json)
    torch.save({**trainer_state, "step": int(step)}, tmp / STATE_FILE)
    for name in os.listdir(tmp):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    # the commit point: after this rename the new set is complete and recover() rolls it forward
    os.replace(tmp, run_dir / READY_DIR)
    _fsync_dir(run_dir)
    _move_ready(run_dir)
    return run_dir


def _move_ready(run_dir: Path) -> None:
    ready = run_dir / READY_DIR
    for name in COMMIT_ORDER:
        if (ready / name).exists():
            os.replace(ready / name, run_dir / name)
    _fsync_dir(run_dir)
    ready.rmdir()


def recover(run_dir: str | Path) -> str | None:
    """Finish or discard an interrupted save; returns "rolled_forward", "discarded" or None."""
    run_dir = Path(run_dir)
    action = None
    if (run_dir / READY_DIR).is_dir():
        _move_ready(run_dir)
        action = "rolled_forward"
    if (run_dir / TMP_DIR).exists():
        shutil.rmtree(run_dir / TMP_DIR)
        action = action or "discarded"
    return action


# ---------------------------------------------------------------------------------------------
# reading


def has_checkpoint(run_dir: str | Path) -> bool:
    """True if the run directory holds a complete checkpoint (after recovering an interrupted save)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    recover(run_dir)
    return (run_dir / STATE_FILE).exists()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        where = f"the folder holds {present}" if present else "the folder is empty or does not exist"
        raise FileNotFoundError(f"{path} is missing ({what}); {where}. Point to a run directory "
                                f"written by `diffusekit train`, or resume/restart the run that wrote it.")
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of a safetensors file; FileNotFoundError names a missing file."""
    path = _require(Path(path), "weights")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(path)), metadata


def weights_step(path: str | Path) -> int | None:
    """The training step recorded in a safetensors file's metadata (None if absent)."""
    with safe_open(str(_require(Path(path), "weights")), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def read_trainer_state(run_dir: str | Path, finish_interrupted: bool = True) -> dict[str, Any]:
    """trainer_state.pt, loaded with weights_only=True, after checking that the weights match its step.

    finish_interrupted=False skips recover() (for readers that must not write).
    """
    run_dir = Path(run_dir)
    if finish_interrupted:
        recover(run_dir)
    path = _require(run_dir / STATE_FILE, "optimizer, step and RNG state for resuming")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name in (EMA_FILE, RAW_FILE):
        step = weights_step(run_dir / name)
        if step is not None and step != state["step"]:
            raise CheckpointError(f"{run_dir / name} is from step {step} but {path} is from step "
                                  f"{state['step']}: the files come from different saves. Restore them "
                                  f"from one save, or start a new run.")
    return state


def read_config_json(run_dir: str | Path) -> dict:
    """The parsed config.json of a run, with errors that name the file."""
    path = _require(Path(run_dir) / CONFIG_FILE, "the run's settings")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from a copy, or rewrite it "
                              f"with the config's to_json().") from e


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable lines describing missing keys, unexpected keys and shape differences."""
    lines = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]

    def few(keys):
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
    if missing:
        lines.append(f"missing from the file: {few(missing)}")
    if unexpected:
        lines.append(f"in the file but not in the model: {few(unexpected)}")
    for k in shapes[:5]:
        lines.append(f"{k}: file has shape {tuple(found[k].shape)}, model has {tuple(expected[k].shape)}")
    if len(shapes) > 5:
        lines.append(f"... {len(shapes)} shape differences in all")
    return lines


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                            hint: str = "") -> None:
    """model.load_state_dict(state_dict) with an error that lists the mismatching keys and shapes."""
    problems = state_dict_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"the weights in {source} do not fit the model built from the config:\n  "
                              + "\n  ".join(problems) + (f"\n{hint}" if hint else ""))
    model.load_state_dict(state_dict, strict=True)
