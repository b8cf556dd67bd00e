"""The one-writer lock of a run folder: RUN/.lock, held by whatever writes the run.

`with RunLock(run_dir):` around everything that writes the run (the trainer holds it for the whole
run). A second RunLock on the run, in any process, raises RunLockedError naming the holder's pid,
which the holder writes into the lock file. The operating system drops the lock of a process that
dies, so kill -9 leaves no stale lock: the lock is flock(2) on POSIX and msvcrt.locking on Windows
(on a byte far past the pid, so that a second process can still read the pid).
`writer(run_dir)` gives the save journal the lock for one write: the one this process holds, or one
taken for the call.
"""
from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .files import CheckpointError, write_error

try:                                    # POSIX
    import fcntl
except ImportError:                     # Windows
    fcntl = None
    import msvcrt

LOCK_FILE = ".lock"
_LOCK_OFFSET = 1 << 30                  # Windows: the locked byte, away from the pid at offset 0
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK)


class RunLockedError(CheckpointError):
    """Another process holds the run's lock (it is training it); `pid` is that process, if known."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


# ---------------------------------------------------------------------------------------------
# the operating system's lock on one open file: flock on POSIX, msvcrt.locking on Windows


def _try_lock(fd: int) -> None:
    """Take the exclusive lock on fd without waiting; OSError with an errno in _BUSY if another holds it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_head(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 32)


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())


# ---------------------------------------------------------------------------------------------
# the run's lock

_HELD: dict[str, "RunLock"] = {}     # run directories this process holds a RunLock on, by real path


def _key(run_dir: str | Path) -> str:
    return os.path.realpath(run_dir)


class RunLock:
    """Exclusive lock on a run directory (on RUN/.lock, which holds the holder's pid).

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
            raise write_error(e, self.path, f"cannot lock the run folder {self.run_dir}") from e
        try:
            _try_lock(fd)
        except OSError as e:
            pid = _holder_pid(fd) if e.errno in _BUSY else None
            os.close(fd)
            if e.errno not in _BUSY:
                raise write_error(e, self.path, f"cannot lock the run folder {self.run_dir}") from e
            who = "another process" if pid is None else f"process {pid}"
            if pid == os.getpid():
                who += " (this process, through another RunLock)"
            raise RunLockedError(f"{self.run_dir} is being trained by {who}; wait for it to finish or use "
                                 f"another --out.", pid) from None
        try:
            _write_pid(fd)
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
        _unlock(self._fd)
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
        try:
            text = _read_head(fd).decode(errors="replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.005)
    return None


@contextmanager
def writer(run_dir: Path, lock: RunLock | None = None) -> Iterator[RunLock]:
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

