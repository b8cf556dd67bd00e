"""Compiled fast paths: torch.compile of a denoiser with an eager fallback, when compiling pays, native bf16.

`maybe_compile(model, enabled)` returns something called exactly like `model` that runs the
torch.compile'd graph. Compiling happens at the first call; where it fails (no C++ compiler for
inductor's CPU kernels, a platform torch.compile does not support, an op it cannot lower) a
RuntimeWarning names the error once and the eager model runs from then on, so `compile=True` never
turns a working run into a failing one. The wrapper holds no parameters of its own: save, load and
update (EMA, optimizer) the original module.

Whether compiling pays is a break-even count: it repays its one-off cost within a run when
    calls * (eager_s - compiled_s) > compile_s
(`compile_pays`). `CPU_BREAK_EVEN_CALLS` holds what bench/train_throughput.py measured on an
AVX512-BF16 CPU (docs/BENCHMARKS.md); `should_compile` applies it to a planned run. On that CPU
compiling pays only for long runs of batch-1 sampling: training and batch-64 sampling are bound by
the convolutions, which inductor hands to the same oneDNN kernels as eager PyTorch.
CUDA graphs (torch.compile mode="reduce-overhead") are not used: untested here, and they reuse output
buffers across calls, which a sampler that keeps earlier model outputs would see overwritten.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

# Model calls after which torch.compile has repaid its cold compile (empty inductor cache) for the
# mnist28 UNet on an AVX512-BF16 CPU, one thread (bench/train_throughput.py --threads 1 --clock cpu,
# docs/BENCHMARKS.md, 2026-11-30): compile CPU-seconds / CPU-seconds saved per call against eager
# bf16, rounded up. None: the compiled model was not faster there, so compiling never pays
# (training: 0.97x eager). Sampling at batch 64: 1.09x after 63 s of compiling (an earlier run on
# 2026-11-29 saw no gain); at batch 1: 1.52x after 60 s.
CPU_BREAK_EVEN_CALLS: dict[str, int | None] = {"train": None, "sample_batch": 4000, "sample_single": 15000}


def compile_pays(calls: int, eager_s: float, compiled_s: float, compile_s: float) -> bool:
    """Whether compiling repays itself within `calls` model calls: calls * (eager_s - compiled_s) > compile_s."""
    return calls * (eager_s - compiled_s) > compile_s


def should_compile(device: torch.device | str, calls: int, *, training: bool, batch_size: int) -> bool:
    """The measured rule: compile when a run makes more model calls than `CPU_BREAK_EVEN_CALLS` for its kind.

    `calls` counts the model calls of the run (training steps times micro-batches, or sampler steps
    times batches); batch_size is the model's batch (1, or 2 for batch 1 with classifier-free
    guidance, counts as single). False on other devices (not measured: pass compile=True to try)
    and where torch.compile is unsupported (`compile_unsupported_reason`).
    """
    if torch.device(device).type != "cpu" or compile_unsupported_reason() is not None:
        return False
    kind = "train" if training else ("sample_single" if batch_size <= 2 else "sample_batch")
    break_even = CPU_BREAK_EVEN_CALLS[kind]
    return break_even is not None and calls > break_even


def compile_wanted(choice: str, device: torch.device | str, calls: int, *, training: bool, batch_size: int) -> bool:
    """`--compile auto|on|off` for a planned run: on and off as said, auto by `should_compile` (measured)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"compile={choice!r}: expected 'auto', 'on' or 'off'.")
    if choice == "auto":
        return should_compile(device, calls, training=training, batch_size=batch_size)
    return choice == "on"


def compile_unsupported_reason() -> str | None:
    """Why torch.compile cannot run in this interpreter, or None where it can."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is None or not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version or platform"
    return None


class CompiledModel:
    """Call a torch.compile'd model; if compiling or running the compiled graph fails, warn once and run eagerly.

    `model` is the eager module (parameters, state_dict, train/eval live there); `error` is the
    compile failure once one happened (then every call is eager).
    """

    def __init__(self, model: Callable, compiled: Callable):
        self.model, self.compiled, self.error = model, compiled, None

    def __call__(self, *args, **kwargs):
        if self.error is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:      # noqa: BLE001  (judged below by re-running eagerly)
                # an error of the inputs or the model raises again eagerly, and is the caller's to see;
                # one that the eager model does not raise came from compiling
                out = self.model(*args, **kwargs)
                self.error = error
                warnings.warn(f"torch.compile failed here ({_root_cause(error)}); running the model "
                              "eagerly from now on (same results, without the compiled speed-up). Pass "
                              "compile=False to skip compiling.", RuntimeWarning, stacklevel=2)
                return out
        return self.model(*args, **kwargs)


def _root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost cause (torch wraps a backend's error in BackendCompilerFailed)."""
    while True:
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def maybe_compile(model: Callable, enabled: bool = True, *, freeze: bool = False, dynamic: bool | None = None,
                  mode: str | None = None, backend: str | Callable = "inductor", fullgraph: bool = False) -> Callable:
    """`model` wrapped to run compiled by torch.compile when `enabled` and supported, else `model` itself.

    freeze: inductor folds the weights into the compiled graph as constants (and pre-packs them
    for oneDNN): faster inference (measured 1.2x at batch 1 on CPU), but the compiled model then
    ignores later changes to the weights, so only for a model that is never trained or updated
    again (a loaded pipeline, not an EMA model during training) and only under torch.no_grad().
    dynamic: None (torch's default) compiles for the first input shapes and recompiles with
    symbolic sizes when a second batch size comes (a sampler's last, smaller batch); False
    recompiles per shape; True starts symbolic. mode / backend / fullgraph go to torch.compile
    (mode "max-autotune" searches kernels at a much larger compile cost).
    """
    if not enabled:
        return model
    reason = compile_unsupported_reason()
    if reason is not None:
        warnings.warn(f"compile=True but {reason}; running the model eagerly.", RuntimeWarning, stacklevel=2)
        return model
    options = {"freezing": True} if freeze and backend == "inductor" else None
    if options is not None and mode is not None:       # torch.compile takes one of mode and options
        raise ValueError(f"freeze=True cannot be combined with mode={mode!r}; drop one of them.")
    return CompiledModel(model, torch.compile(model, dynamic=dynamic, mode=mode, backend=backend,
                                              fullgraph=fullgraph, options=options))
