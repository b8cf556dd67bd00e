"""A run directory on disk: config.json, EMA and raw weights, trainer state; one writer, atomic saves, checked loads.

Layout (DESIGN.md, "Run directory"):
  config.json            the resolved run config (written by the caller as JSON text)
  model.safetensors      EMA weights, metadata {"step": "N", "weights": "ema", ...}
  model_raw.safetensors  raw (optimised) weights, same metadata with "weights": "raw"
  trainer_state.pt       {"step": N, optimizer state, ...}: plain tensors/lists/dicts, read weights_only
  .lock                  the writer's lock file (fcntl.flock), holding the writer's pid

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

Readers never write. They see the files as of the last completed move, except in the move window
(`ckpt.ready/` present), when the committed set is the files still in `ckpt.ready/` plus those
already moved: `committed_files` takes each file from `ckpt.ready/` when it is there and from the
run directory otherwise. `read_checkpoint` opens that set, checks that no save moved a file while
it was being opened (else it opens it again), and reads the open files, which stay intact when a
later save replaces them; so a reader never mixes two saves and never disturbs the writer.

Integrity: each safetensors file records `content_hash` of its tensors in its metadata; `read_weights`
recomputes it and checks that every floating tensor is finite (files without a hash, from older
runs, load without the hash check). trainer_state.pt is only ever loaded with weights_only=True.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import safetensors.torch
import torch

CONFIG_FILE = "config.json"
EMA_FILE = "model.safetensors"
RAW_FILE = "model_raw.safetensors"
STATE_FILE = "trainer_state.pt"
LOCK_FILE = ".lock"
TMP_DIR = "ckpt.tmp"          # a save in progress: incomplete, discarded by recover()
READY_DIR = "ckpt.ready"      # a complete save being moved into place: finished by recover()
COMMIT_ORDER = (CONFIG_FILE, EMA_FILE, RAW_FILE, STATE_FILE)   # trainer_state.pt last
HASH_KEY = "diffusekit.content_sha256"   # safetensors metadata key of content_hash(); not returned by read_weights
RESTORE = "restore it from a copy or a checkpoint-STEP folder"
_WHAT = {CONFIG_FILE: "the run's settings", EMA_FILE: "EMA weights", RAW_FILE: "raw weights",
         STATE_FILE: "optimizer, step and RNG state for resuming"}


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked; the message says why and what to do."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a run failed in the operating system (disk full, unwritable folder); errno is kept."""


class RunLockedError(CheckpointError):
    """Another process holds the run's lock (it is training it); `pid` is that process, if known."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


# ---------------------------------------------------------------------------------------------
# the one-writer lock

_HELD: dict[str, "RunLock"] = {}     # run directories this process holds a RunLock on, by real path


def _key(run_dir: str | Path) -> str:
    return os.path.realpath(run_dir)


class RunLock:
    """Exclusive lock on a run directory (flock on RUN/.lock, which holds the holder's pid).

    `with RunLock(run_dir):` around everything that writes the run. A second RunLock on the run,
    in any process, raises RunLockedError naming the holder. The folder must exist.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(e, self.path, f"cannot lock the run folder {self.run_dir}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _holder_pid(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _write_error(e, self.path, f"cannot lock the run folder {self.run_dir}") from e
            who = "another process" if pid is None else f"process {pid}"
            if pid == os.getpid():
                who += " (this process, through another RunLock)"
            raise RunLockedError(f"{self.run_dir} is being trained by {who}; wait for it to finish or use "
                                 f"another --out.", pid) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass        # the pid only makes the message for a second writer better; the lock holds without it
        self._fd = fd
        _HELD[_key(self.run_dir)] = self
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if _HELD.get(_key(self.run_dir)) is self:
            del _HELD[_key(self.run_dir)]
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.run_dir)!r}, held={self.held})"


def _holder_pid(fd: int) -> int | None:
    # the holder writes its pid just after taking the lock: give it a moment
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.005)
    return None


@contextmanager
def _writer(run_dir: Path, lock: RunLock | None = None) -> Iterator[RunLock]:
    """The run's lock for one write: `lock` (which must hold run_dir), the one this process holds, or a new one."""
    if lock is not None:
        if not lock.held or _key(lock.run_dir) != _key(run_dir):
            raise ValueError(f"{lock!r} does not hold {run_dir}; acquire a RunLock on {run_dir} first.")
        yield lock
    elif _key(run_dir) in _HELD:
        yield _HELD[_key(run_dir)]
    else:
        with RunLock(run_dir) as new:
            yield new


# ---------------------------------------------------------------------------------------------
# writing

_FIXES = {
    errno.ENOSPC: "free disk space, or choose another output folder (--out)",
    errno.EDQUOT: "free disk space (a quota is full), or choose another output folder (--out)",
    errno.EFBIG: "the disk or a file-size limit (ulimit -f) refused more data: free space, lift the limit, "
                 "or choose another output folder (--out)",
    errno.EACCES: "make the folder writable, or choose another output folder (--out)",
    errno.EPERM: "make the folder writable, or choose another output folder (--out)",
    errno.EROFS: "the disk is read-only: choose another output folder (--out)",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another output folder (--out)",
    errno.EEXIST: "the path is a file, not a folder: choose another output folder (--out)",
}


_ANY_PATH_FIXES = {
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "part of the path is a file, not a folder: choose another path",
    errno.EACCES: "check the permissions of the path (a folder must be writable to write into it), or choose another",
    errno.EPERM: "check the permissions of the path (a folder must be writable to write into it), or choose another",
    errno.EROFS: "the disk is read-only: choose another path",
    errno.EISDIR: "the path is a folder: give a file name",
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError that an input caused (a path of the CLI): the path, the reason and the fix."""
    reason = e.strerror or str(e) or type(e).__name__
    fix = _ANY_PATH_FIXES.get(e.errno) or _FIXES.get(e.errno) or "check the path, its permissions and the free disk space"
    return f"{e.filename or 'a file'}: {reason}; {fix.replace(' (--out)', '')}."


def _write_error(e: OSError, path: Path, doing: str, kept: str = "") -> CheckpointWriteError:
    reason = e.strerror or str(e) or type(e).__name__
    fix = _FIXES.get(e.errno, "check the folder and the disk, or choose another output folder (--out)")
    err = CheckpointWriteError(f"{doing}: {e.filename or path}: {reason}; {kept}{fix}.")
    err.errno = e.errno
    return err


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
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


def save_file(tensors: dict[str, torch.Tensor], filename: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file written with Python's file I/O, so that a full disk raises OSError."""
    _write_bytes(Path(filename), safetensors.torch.save(tensors, metadata=metadata))


def content_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted key order (hex digest)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # safetensors wants contiguous tensors that share no memory; channels_last weights are not contiguous
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(state_dict, path, metadata={**metadata, HASH_KEY: content_hash(state_dict)})


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) to a temporary file beside path, then os.replace it over path: readers never see half a
    file, and a failed write (a kill, a full disk) leaves the previous file intact and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_error(e, path, f"could not write {path}", "the previous file is intact; ") from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to path through a temporary file and os.replace, so readers never see half a file."""
    return replace_atomically(path, lambda tmp: _write_bytes(tmp, text.encode()))


def write_weights_atomic(path: str | Path, state_dict: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> Path:
    """Write one safetensors file (with its content hash) through a temporary file and os.replace."""
    return replace_atomically(path, lambda tmp: _save_weights(tmp, state_dict, metadata or {}))


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
        raise _write_error(e, run_dir, f"cannot create the run folder {run_dir}") from e
    with _writer(run_dir, lock):
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
                raise _write_error(e, tmp, f"could not save step {step} in {run_dir}", kept) from e
            raise
        _fsync_dir(run_dir)
        try:
            _move_ready(run_dir)
        except OSError as e:
            raise _write_error(e, run_dir / READY_DIR, f"the save of step {step} is complete in "
                               f"{run_dir / READY_DIR} but could not be moved into {run_dir}",
                               "the next save or resume finishes the move; ") from e
    return run_dir


def _write_set(tmp: Path, step: int, ema, raw, trainer_state, config_json, metadata) -> None:
    meta = {**metadata, "step": str(int(step))}
    _save_weights(tmp / EMA_FILE, ema, {**meta, "weights": "ema"})
    _save_weights(tmp / RAW_FILE, raw, {**meta, "weights": "raw"})
    if config_json is not None:
        _write_bytes(tmp / CONFIG_FILE, config_json.encode())
    buffer = io.BytesIO()
    torch.save({**trainer_state, "step": int(step)}, buffer)
    _write_bytes(tmp / STATE_FILE, buffer.getvalue())
    _fsync_dir(tmp)


def _move_ready(run_dir: Path) -> None:
    ready = run_dir / READY_DIR
    for name in COMMIT_ORDER:
        if (ready / name).exists():
            os.replace(ready / name, run_dir / name)
    _fsync_dir(run_dir)
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
        raise _write_error(e, run_dir, f"cannot finish the interrupted save in {run_dir}") from e
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
    with _writer(run_dir, lock):
        return _recover(run_dir)


def _recover_if_free(run_dir: Path) -> None:
    """recover() when there is something to recover and no other process writes the run; else nothing."""
    if not ((run_dir / READY_DIR).exists() or (run_dir / TMP_DIR).exists()):
        return
    try:
        recover(run_dir)
    except (RunLockedError, OSError):
        pass        # a trainer owns the run, or the folder is read-only: read the committed set as it is


# ---------------------------------------------------------------------------------------------
# reading (never writes, except has_checkpoint/read_trainer_state's opt-in recovery of a free run)

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
    _recover_if_free(run_dir)
    return STATE_FILE in committed_files(run_dir)


def _missing(path: Path, what: str) -> FileNotFoundError:
    present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    where = f"the folder holds {present}" if present else "the folder is empty or does not exist"
    return FileNotFoundError(f"{path} is missing ({what}); {where}. Point to a run directory "
                             f"written by `diffusekit train`, or resume/restart the run that wrote it.")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise _missing(path, what)
    return path


def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or not a safetensors file ({reason}); {RESTORE}, or save "
                           f"it again.")


def _parse_weights(data: bytes, path: Path, verify: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        state_dict = safetensors.torch.load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = dict(json.loads(data[8:8 + header_len]).get("__metadata__") or {})
    except Exception as e:      # whatever the parser trips on, these bytes are not a whole safetensors file
        raise _not_safetensors(path, str(e) or type(e).__name__) from None
    recorded = metadata.pop(HASH_KEY, None)
    if verify:
        _verify(state_dict, recorded, path)
    return state_dict, metadata


def _verify(state_dict: dict[str, torch.Tensor], recorded: str | None, path: Path) -> None:
    if recorded is not None and content_hash(state_dict) != recorded:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the hash recorded when it was "
                              f"saved; {RESTORE}.")
    for key, t in state_dict.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path} holds NaN or inf in {key} ({bad} of {t.numel()} values): the "
                                  f"weights were saved after training diverged, or the file was damaged; "
                                  f"{RESTORE}, or resume from an earlier checkpoint.")


def read_weights(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of a safetensors file, checked against its content hash and for NaN/inf.

    verify=False skips both checks. Errors name the file: missing (FileNotFoundError), truncated
    or not safetensors, corrupt, or non-finite (CheckpointError). The metadata omits HASH_KEY.
    """
    path = _require(Path(path), "weights")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}; check that it is a readable file.") from e
    return _parse_weights(data, path, verify)


def _header_metadata(f: BinaryIO, path: Path) -> dict[str, str]:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    raw = f.read(n) if 0 < n <= 100_000_000 else b""
    try:
        if not raw or len(raw) != n:
            raise ValueError("header too small" if len(head) < 8 else "the header is cut short")
        header = json.loads(raw)
        return dict(header.get("__metadata__") or {})
    except (ValueError, AttributeError) as e:
        raise _not_safetensors(path, str(e)) from None


def weights_step(path: str | Path) -> int | None:
    """The training step recorded in a safetensors file's metadata (None if absent)."""
    path = _require(Path(path), "weights")
    with open(path, "rb") as f:
        step = _header_metadata(f, path).get("step")
    return int(step) if step is not None else None


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
        _recover_if_free(run_dir)
    with _open_committed(run_dir, (EMA_FILE, RAW_FILE, STATE_FILE)) as files:
        if STATE_FILE not in files:
            raise _missing(run_dir / STATE_FILE, _WHAT[STATE_FILE])
        state_path, f = files[STATE_FILE]
        state = _load_state(f, state_path)
        found = []
        for name in (EMA_FILE, RAW_FILE):
            if name not in files:
                raise _missing(run_dir / name, "weights")
            step = _header_metadata(files[name][1], files[name][0]).get("step")
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
            raise _missing(run_dir / CONFIG_FILE, _WHAT[CONFIG_FILE])
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
                raise _missing(run_dir / name, _WHAT.get(name, "weights"))
        config = _parse_json(files[CONFIG_FILE][1].read(), files[CONFIG_FILE][0]) if CONFIG_FILE in files else None
        loaded = {name: _parse_weights(files[name][1].read(), files[name][0], verify) for name in weights}
        state = _load_state(files[STATE_FILE][1], files[STATE_FILE][0]) if trainer_state else None
    found = [(files[n][0], int(meta["step"]) if "step" in meta else None) for n, (_, meta) in loaded.items()]
    if state is not None:
        found.append((files[STATE_FILE][0], state["step"]))
    if found:
        _check_steps(found)
    steps = [step for _, step in found if step is not None]
    return Checkpoint(step=steps[-1] if steps else None, files={n: p for n, (p, _) in files.items()},
                      config=config, weights=loaded, trainer_state=state)


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


# ---------------------------------------------------------------------------------------------
# checkpoint history: RUN/checkpoint-STEP/ folders beside the latest save

HISTORY_PREFIX = "checkpoint-"


def checkpoint_history(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoint-STEP/ folders, oldest first."""
    out = []
    for path in Path(run_dir).glob(f"{HISTORY_PREFIX}*"):
        suffix = path.name[len(HISTORY_PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).exists():
            out.append((int(suffix), path))
    return sorted(out)


def snapshot_checkpoint(run_dir: str | Path, step: int, keep: int) -> Path:
    """Keep the save just committed as RUN/checkpoint-STEP/ (hard links: no extra disk until the next save
    replaces the files) and delete the oldest folders beyond `keep` (0 = keep every one)."""
    run_dir = Path(run_dir)
    target = run_dir / f"{HISTORY_PREFIX}{step}"
    tmp = run_dir / f"{HISTORY_PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in COMMIT_ORDER:
        src = run_dir / name
        if src.exists():
            try:
                os.link(src, tmp / name)       # the next save os.replace()s the name; this inode stays
            except OSError:
                shutil.copy2(src, tmp / name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    history = checkpoint_history(run_dir)
    for _, old in history[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def resume_folder(run_dir: str | Path, resume_from: str | int | None) -> Path:
    """The folder a resume reads: the run itself ("latest"/None), RUN/checkpoint-STEP (a step), or a path."""
    run_dir = Path(run_dir)
    if resume_from in (None, "latest"):
        return run_dir
    text = str(resume_from)
    if text.isdigit():
        folder = run_dir / f"{HISTORY_PREFIX}{int(text)}"
        if not (folder / STATE_FILE).exists():
            steps = [s for s, _ in checkpoint_history(run_dir)]
            raise CheckpointError(f"{run_dir} has no checkpoint at step {text}; its checkpoints are at steps "
                                  f"{steps or 'none (only the latest save)'}: use --resume latest or one of those.")
        return folder
    folder = Path(text)
    if not (folder / STATE_FILE).exists():
        raise CheckpointError(f"--resume {text}: {folder} holds no {STATE_FILE}; give latest, a step of "
                              f"{run_dir}'s checkpoint-STEP folders, or a checkpoint folder.")
    return folder
