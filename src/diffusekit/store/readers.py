"""Reading a run's last committed save, consistently, while its trainer may be writing the next one.

Readers never write (except has_checkpoint/read_trainer_state's opt-in recovery of a run no one
trains). They see the files as of the last completed move of the save journal (store.journal),
except in the move window (`ckpt.ready/` present), when the committed set is the files still in
`ckpt.ready/` plus those already moved: `committed_files` takes each file from `ckpt.ready/` when it
is there and from the run directory otherwise. `read_checkpoint` opens that set, checks that no save
moved a file while it was being opened (else it opens it again), and reads the open files, which
stay intact when a later save replaces them; so a reader never mixes two saves and never disturbs
the writer. trainer_state.pt is only ever loaded with weights_only=True.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from .files import RESTORE, CheckpointError, header_metadata, missing_file, parse_weights
from .journal import CONFIG_FILE, COMMIT_ORDER, EMA_FILE, RAW_FILE, READY_DIR, STATE_FILE, WHAT, recover_if_free

_OPEN_ATTEMPTS = 50


def committed_files(run_dir: str | Path) -> dict[str, Path]:
    """The files of the last committed save, by name: those in ckpt.ready/ override the run directory's."""
    run_dir = Path(run_dir)
    try:
        in_ready = set(os.listdir(run_dir / READY_DIR))
    except (FileNotFoundError, NotADirectoryError):
        in_ready = set()
    files = {}
    for name in COMMIT_ORDER:
        if name in in_ready:
            files[name] = run_dir / READY_DIR / name
        elif (run_dir / name).is_file():
            files[name] = run_dir / name
    return files


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _scan(run_dir: Path) -> dict[str, tuple[Path, tuple]]:
    return {name: (path, _identity(os.stat(path))) for name, path in committed_files(run_dir).items()}


@contextmanager
def _open_committed(run_dir: Path, names) -> Iterator[dict[str, tuple[Path, BinaryIO]]]:
    """Open the committed files among `names` as one save: the scans before and after the opens must agree."""
    for attempt in range(_OPEN_ATTEMPTS):
        handles: dict[str, tuple[Path, BinaryIO]] = {}
        try:
            before = _scan(run_dir)
            for name in names:
                if name in before:
                    path, ident = before[name]
                    handles[name] = (path, open(path, "rb"))
                    if _identity(os.fstat(handles[name][1].fileno())) != ident:
                        raise FileNotFoundError(path)     # replaced between the scan and the open
            if _scan(run_dir) == before:
                break
        except FileNotFoundError:
            pass            # a save moved a file meanwhile: scan again
        except OSError as e:
            _close(handles)
            raise CheckpointError(f"cannot read {e.filename or run_dir}: {e.strerror or e}; check that the "
                                  f"run folder is readable.") from e
        _close(handles)
        time.sleep(0.001 * (attempt + 1))
    else:
        raise CheckpointError(f"{run_dir} changed during each of {_OPEN_ATTEMPTS} attempts to read its last "
                              f"checkpoint; try again, or read it when its trainer is paused.")
    try:
        yield handles
    finally:
        _close(handles)


def _close(handles: dict[str, tuple[Path, BinaryIO]]) -> None:
    for _, f in handles.values():
        f.close()


def has_checkpoint(run_dir: str | Path) -> bool:
    """True if the run directory holds a complete checkpoint (recovering an interrupted save if no one trains it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    recover_if_free(run_dir)
    return STATE_FILE in committed_files(run_dir)



def _load_state(f: BinaryIO, path: Path) -> dict[str, Any]:
    """trainer_state.pt with weights_only=True; anything else it could hold is refused, never unpickled."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:      # truncated zip, empty file, or a pickle that asks for arbitrary objects
        found = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        reason = (f"it asks to import {found.group(1)}, which a trainer state never holds" if found else
                  (str(e).split(". ")[0][:120] or type(e).__name__))
        state = None
    else:
        reason = "it holds no training step"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} cannot be loaded: it is damaged or was not written by diffusekit "
                              f"({reason}). {RESTORE[0].upper() + RESTORE[1:]}, or start a new run; never "
                              f"load it with weights_only=False, which would run any code stored in it.")
    return state


def _check_steps(found: list[tuple[Path, int | None]]) -> None:
    """The files of one save share one step; the last entry is the reference (trainer_state when read)."""
    ref_path, ref_step = found[-1]
    for path, step in found[:-1]:
        if step is not None and ref_step is not None and step != ref_step:
            raise CheckpointError(f"{path} is from step {step} but {ref_path} is from step {ref_step}: the "
                                  f"files come from different saves. Restore them from one save, or start a "
                                  f"new run.")


def read_trainer_state(run_dir: str | Path, finish_interrupted: bool = True) -> dict[str, Any]:
    """trainer_state.pt, loaded with weights_only=True, after checking that the weights match its step.

    finish_interrupted=True first recovers an interrupted save if no other process holds the run's
    lock; finish_interrupted=False never writes (for readers). Either way the committed set is read.
    """
    run_dir = Path(run_dir)
    if finish_interrupted:
        recover_if_free(run_dir)
    with _open_committed(run_dir, (EMA_FILE, RAW_FILE, STATE_FILE)) as files:
        if STATE_FILE not in files:
            raise missing_file(run_dir / STATE_FILE, WHAT[STATE_FILE])
        state_path, f = files[STATE_FILE]
        state = _load_state(f, state_path)
        found = []
        for name in (EMA_FILE, RAW_FILE):
            if name not in files:
                raise missing_file(run_dir / name, "weights")
            step = header_metadata(files[name][1], files[name][0]).get("step")
            found.append((files[name][0], int(step) if step is not None else None))
    _check_steps([*found, (state_path, state["step"])])
    return state


def _parse_json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from a copy, or rewrite it "
                              f"with the config's to_json().") from e


def read_config_json(run_dir: str | Path) -> dict:
    """The parsed config.json of a run (the committed one), with errors that name the file."""
    run_dir = Path(run_dir)
    with _open_committed(run_dir, (CONFIG_FILE,)) as files:
        if CONFIG_FILE not in files:
            raise missing_file(run_dir / CONFIG_FILE, WHAT[CONFIG_FILE])
        path, f = files[CONFIG_FILE]
        return _parse_json(f.read(), path)


@dataclass
class Checkpoint:
    """One committed save of a run, read consistently by read_checkpoint."""

    step: int | None                  # the save's training step (from the weights or trainer_state)
    files: dict[str, Path]            # where each file was read from (ckpt.ready/ during a move)
    config: dict | None               # parsed config.json; None if the run has none
    weights: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]   # file name -> (state_dict, metadata)
    trainer_state: dict[str, Any] | None


def read_checkpoint(run_dir: str | Path, weights: tuple[str, ...] = (EMA_FILE,), *, trainer_state: bool = False,
                    verify: bool = True) -> Checkpoint:
    """The last committed save of a run, as one consistent set, without writing anything.

    Safe while the run trains: the files are opened as one save (see the module docstring) and
    then read; config.json, the asked weights files (EMA_FILE, RAW_FILE) and, if asked,
    trainer_state.pt. Weights are checked as in read_weights(verify=...); all files must agree on
    the step. A missing weights or state file raises FileNotFoundError naming it.
    """
    run_dir = Path(run_dir)
    wanted = (CONFIG_FILE, *weights, *((STATE_FILE,) if trainer_state else ()))
    with _open_committed(run_dir, wanted) as files:
        for name in wanted[1:]:
            if name not in files:
                raise missing_file(run_dir / name, WHAT.get(name, "weights"))
        config = _parse_json(files[CONFIG_FILE][1].read(), files[CONFIG_FILE][0]) if CONFIG_FILE in files else None
        loaded = {name: parse_weights(files[name][1].read(), files[name][0], verify) for name in weights}
        state = _load_state(files[STATE_FILE][1], files[STATE_FILE][0]) if trainer_state else None
    found = [(files[n][0], int(meta["step"]) if "step" in meta else None) for n, (_, meta) in loaded.items()]
    if state is not None:
        found.append((files[STATE_FILE][0], state["step"]))
    if found:
        _check_steps(found)
    steps = [step for _, step in found if step is not None]
    return Checkpoint(step=steps[-1] if steps else None, files={n: p for n, (p, _) in files.items()},
                      config=config, weights=loaded, trainer_state=state)


