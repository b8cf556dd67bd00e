"""Shared test set-up: one intra-op thread per test process.

The suite's tensors are tiny, so threads only add overhead, and on a busy 2-core machine they
thrash badly; scripts/test.sh runs two pytest workers (pytest-xdist) to use both cores instead.
"""
import os

# before numpy and torch load their thread pools: inherited by subprocesses (torchrun, the killed trainer)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
