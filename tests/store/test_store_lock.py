"""The run lock without fcntl (as on Windows): the module imports, a second writer is refused with the
holder's pid, and the lock is free again once the holder is gone. msvcrt.locking is stood in for by
os.lockf, which has its semantics (lock n bytes from the file position, fail at once if taken)."""
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "lockf"), reason="needs os.lockf to stand in for msvcrt.locking")

WINDOWS_LIKE = """
import builtins, os, subprocess, sys, types
import torch  # noqa: F401  (imported before msvcrt exists, as the standard library is on Windows)
real_import = builtins.__import__
def importer(name, globals=None, *args, **kwargs):
    if name == "fcntl" and (globals or {}).get("__name__") == "diffusekit.store.lock":
        raise ImportError("no fcntl (Windows)")
    return real_import(name, globals, *args, **kwargs)
builtins.__import__ = importer
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_NBLCK, msvcrt.LK_UNLCK = 2, 0
def locking(fd, mode, nbytes):
    os.lockf(fd, os.F_TLOCK if mode == msvcrt.LK_NBLCK else os.F_ULOCK, nbytes)
msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt
import diffusekit.store.lock as lock_module
assert lock_module.fcntl is None, "the POSIX lock was used"
from diffusekit.store import RunLock, RunLockedError
"""

HOLD = WINDOWS_LIKE + """
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""

TRY = WINDOWS_LIKE + """
try:
    with RunLock(sys.argv[1]):
        print("acquired")
except RunLockedError as e:
    print("refused", e.pid, e)
"""


def _try(run_dir) -> str:
    return subprocess.run([sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True,
                          timeout=120, check=True).stdout.strip()


def test_windows_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = _try(tmp_path)
        assert out.startswith(f"refused {holder.pid} ") and f"being trained by process {holder.pid}" in out
    finally:
        holder.send_signal(signal.SIGKILL)     # the operating system drops the lock of a dead process
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    assert _try(tmp_path) == "acquired"
