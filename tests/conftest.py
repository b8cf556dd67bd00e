"""Shared test set-up: one intra-op thread per test process, and a guard on process-wide state.

The suite's tensors are tiny, so threads only add overhead, and on a busy 2-core machine they
thrash badly; scripts/test.sh runs two pytest workers (pytest-xdist) to use both cores instead.

Every test runs in a process that later tests share, so a test that changes torch's process-wide
settings (threads, default dtype, grad or inference mode, autocast, deterministic algorithms, matmul
precision) or the working folder and does not put them back fails itself, naming what it left behind,
instead of making an unrelated later test fail. Restore with monkeypatch or try/finally.
"""
import os
import sys
from pathlib import Path

# before numpy and torch load their thread pools: inherited by subprocesses (torchrun, the killed trainer)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
# `diffusekit train` times a few steps before training (training/estimate.py): off unless a test asks for it
os.environ["DIFFUSEKIT_ESTIMATE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests mirror the source in folders (tests/samplers, tests/training, ...) without __init__.py files, and
# some share helpers across folders (test_multinode's launcher, test_interop_t2i's tiny SD folder): every
# test folder is importable by module name, as the flat folder was.
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name.isidentifier()):
    if _folder.name != "fixtures" and str(_folder) not in sys.path:
        sys.path.append(str(_folder))

torch.set_num_threads(1)

# name -> (read it, put a value back)
GLOBALS = {
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
    "torch.is_inference_mode_enabled()": (torch.is_inference_mode_enabled, None),
    "torch.is_autocast_enabled('cpu')": (lambda: torch.is_autocast_enabled("cpu"),
                                         lambda v: torch.set_autocast_enabled("cpu", v)),
    "torch.are_deterministic_algorithms_enabled()": (torch.are_deterministic_algorithms_enabled,
                                                     torch.use_deterministic_algorithms),
    "torch.get_float32_matmul_precision()": (torch.get_float32_matmul_precision,
                                             torch.set_float32_matmul_precision),
    "os.getcwd()": (os.getcwd, os.chdir),
}


@pytest.fixture(autouse=True)
def _process_state_is_left_as_found():
    before = {name: read() for name, (read, _) in GLOBALS.items()}
    yield
    left = []
    for name, (read, restore) in GLOBALS.items():
        now = read()
        if now != before[name]:
            left.append(f"{name} is {now!r}, was {before[name]!r}")
            if restore is not None:
                restore(before[name])
    if left:
        pytest.fail("this test changed process-wide state that later tests share and did not restore it "
                    "(use monkeypatch or try/finally): " + "; ".join(left), pytrace=False)
