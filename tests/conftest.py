"""Shared test set-up: one intra-op thread per test process, and a guard on process-wide state.

The suite's tensors are tiny, so threads only add overhead, and on a busy 2-core machine they
thrash badly; scripts/test.sh runs two pytest workers (pytest-xdist) to use both cores instead.

Every test runs in a process that later tests share, so a test that changes torch's process-wide
settings (threads, default dtype, grad or inference mode, autocast, deterministic algorithms, matmul
precision) or the working folder and does not put them back fails itself, naming what it left behind,
instead of making an unrelated later test fail. Restore with monkeypatch or try/finally.
"""
import os

# before numpy and torch load their thread pools: inherited by subprocesses (torchrun, the killed trainer)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

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
