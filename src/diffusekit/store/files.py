"""Atomic file I/O and the weights file format: what every writer of a run folder stands on.

Files are only ever replaced whole: `replace_atomically` writes a temporary file beside the target
and os.replace()s it over the target, so a reader sees the old file or the new one, never half a
file, and a failed write (a kill, a full disk) leaves the previous file intact and no temporary behind.
An OSError becomes `CheckpointWriteError`, whose message names the path, the reason and the fix.

Integrity: each safetensors file records `content_hash` of its tensors in its metadata under
HASH_KEY; `read_weights` recomputes it and checks that every floating tensor is finite (files
without a hash, from older runs, load without the hash check). `load_state_dict_checked` loads
weights into a model with an error that lists missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

import safetensors.torch
import torch

HASH_KEY = "diffusekit.content_sha256"   # safetensors metadata key of content_hash(); not returned by read_weights
RESTORE = "restore it from a copy or a checkpoint-STEP folder"


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked; the message says why and what to do."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a run failed in the operating system (disk full, unwritable folder); errno is kept."""



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
    """One line for an OSError that an input caused (a path of the CLI): the path, the reason and the fix.
    An OSError raised with a message written for the user (no errno, no path) is that message as it is."""
    if e.errno is None and e.filename is None and str(e):
        return str(e)
    reason = e.strerror or str(e) or type(e).__name__
    fix = _ANY_PATH_FIXES.get(e.errno) or _FIXES.get(e.errno) or "check the path, its permissions and the free disk space"
    return f"{e.filename or 'a file'}: {reason}; {fix.replace(' (--out)', '')}."


def write_error(e: OSError, path: Path, doing: str, kept: str = "") -> CheckpointWriteError:
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


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
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
    write_bytes(Path(filename), safetensors.torch.save(tensors, metadata=metadata))


def content_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted key order (hex digest)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
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
        raise write_error(e, path, f"could not write {path}", "the previous file is intact; ") from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to path through a temporary file and os.replace, so readers never see half a file."""
    return replace_atomically(path, lambda tmp: write_bytes(tmp, text.encode()))


def write_weights_atomic(path: str | Path, state_dict: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> Path:
    """Write one safetensors file (with its content hash) through a temporary file and os.replace."""
    return replace_atomically(path, lambda tmp: save_weights(tmp, state_dict, metadata or {}))



# ---------------------------------------------------------------------------------------------
# reading weights


def missing_file(path: Path, what: str) -> FileNotFoundError:
    present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    where = f"the folder holds {present}" if present else "the folder is empty or does not exist"
    return FileNotFoundError(f"{path} is missing ({what}); {where}. Point to a run directory "
                             f"written by `diffusekit train`, or resume/restart the run that wrote it.")


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise missing_file(path, what)
    return path


def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or not a safetensors file ({reason}); {RESTORE}, or save "
                           f"it again.")


def parse_weights(data: bytes, path: Path, verify: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    path = require_file(Path(path), "weights")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}; check that it is a readable file.") from e
    return parse_weights(data, path, verify)


def header_metadata(f: BinaryIO, path: Path) -> dict[str, str]:
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
    path = require_file(Path(path), "weights")
    with open(path, "rb") as f:
        step = header_metadata(f, path).get("step")
    return int(step) if step is not None else None



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


