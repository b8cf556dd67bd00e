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

CUDA graphs for fixed-shape sampling on a GPU (`GraphedModel`): a sampler calls the network with the
same shapes at every step, so the network's kernel launches are recorded once per input signature
and replayed, which removes the per-launch CPU overhead that dominates small batches. torch.compile's
mode="reduce-overhead" is not used for this: it reuses its output buffers across calls, so a
multistep sampler that keeps earlier model outputs would see them overwritten; `GraphedModel`
returns a copy of the graph's output instead, checks the first replay of every graph against the
eager model, and runs eagerly (warning once) wherever capturing fails or would be wrong.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
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


# --- CUDA graphs --------------------------------------------------------------------------------
def is_capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on tensor's device now. Input checks that read a value on
    the host (`bool(bad.any())`) synchronise, which a capture forbids: they skip while capturing (the
    first call of every graphed shape runs eagerly, checks included, and Pipeline checks labels itself)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


class CudaGraphCapture:
    """Records fn's kernels into a torch.cuda.CUDAGraph (after warm-up runs on a side stream, as CUDA
    graphs require) and returns (replay, output). Each graph keeps its own memory pool: graphs of
    different batch sizes are replayed in any order, which a shared pool does not allow."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup

    def __call__(self, fn: Callable[[], torch.Tensor], device: torch.device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):        # cuDNN / cuBLAS pick their kernels and workspaces here
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the demo's other requests) may use the GPU while this one captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out


@dataclass
class _Graph:
    inputs: list            # the static input tensors, refilled before every replay
    replay: Callable
    output: torch.Tensor    # the static output tensor, overwritten by every replay


@dataclass
class GraphedModel:
    """`model(x, t, **cond)` replayed from one CUDA graph per input signature; eager where it cannot be.

    The signature is every tensor input's shape, dtype and device plus every other input's value, so
    a sampler's fixed-shape steps replay one graph and a last, smaller batch records its own (up to
    max_graphs; then eager). Each replay copies the inputs into the graph's static buffers and returns
    a copy of its static output, so outputs kept across calls (multistep solvers) stay intact; a lock
    serialises callers (a web page's concurrent requests share the buffers). Eager
    instead: with autograd enabled (gradient guidance differentiates through the model), for inputs
    that are not plain values, and for a signature whose capture failed or whose first replay
    differed from the eager model beyond `rtol` (both warn once). `capture(fn, device) -> (replay,
    output)` records fn (CudaGraphCapture on a GPU; tests substitute a recorder with the same
    semantics). The model must keep no Python-side state that changes between calls (a graph replays
    the kernels of its capture, not the Python code).
    """
    model: Callable
    capture: Callable = field(default_factory=CudaGraphCapture)
    max_graphs: int = 8
    rtol: float = 1e-2
    graphs: dict = field(default_factory=dict)
    eager: dict = field(default_factory=dict)   # signature -> why it runs eagerly
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)   # static buffers: one caller at a time

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        values = [x, t, *cond.values()]
        key = self._signature(values, tuple(cond))
        if key is None or torch.is_grad_enabled():
            return self.model(x, t, **cond)
        with self.lock:
            return self._call(key, values, x, t, cond)

    def _call(self, key, values: list, x, t, cond: dict) -> torch.Tensor:
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.eager:
                return self.model(x, t, **cond)
            if len(self.graphs) >= self.max_graphs:
                return self._eager(key, f"more than {self.max_graphs} input shapes", x, t, cond)
            graph, error = self._record(values, tuple(cond))
            return self._checked(key, graph, error, values, x, t, cond)
        return self._replay(graph, values).clone()

    @staticmethod
    def _replay(graph: _Graph, values: list) -> torch.Tensor:
        """Copy the inputs into the graph's static tensors and replay it; its (static) output tensor."""
        for static, value in zip(graph.inputs, values):
            if isinstance(value, torch.Tensor):
                static.copy_(value)
        graph.replay()
        return graph.output

    @staticmethod
    def _signature(values: list, names: tuple) -> tuple | None:
        """Hashable description of the inputs, or None when one of them cannot be part of a graph's key."""
        key = [names]
        for value in values:
            if isinstance(value, torch.Tensor):
                key.append((tuple(value.shape), value.dtype, value.device, value.requires_grad))
            elif value is None or isinstance(value, (bool, int, float, str)):
                key.append((type(value).__name__, value))
            else:
                return None
        return tuple(key)

    def _record(self, values: list, names: tuple):
        """Capture the model on static copies of `values`: (graph, None), or (None, the error) where it failed."""
        statics = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]
        x = statics[0]

        def run():
            return self.model(statics[0], statics[1], **dict(zip(names, statics[2:])))
        try:
            replay, output = self.capture(run, x.device)
        except Exception as error:      # noqa: BLE001  (an op that cannot be captured: run eagerly)
            return None, error
        return _Graph(statics, replay, output), None

    def _checked(self, key, graph: _Graph | None, error, values: list, x, t, cond: dict) -> torch.Tensor:
        """The first call of a new signature: the eager result, kept only if the graph reproduces it."""
        if graph is None:
            return self._eager(key, f"capturing failed ({_root_cause(error)})", x, t, cond)
        expected = self.model(x, t, **cond)
        replayed = self._replay(graph, values)
        scale = float(expected.float().abs().max().clamp_min(1.0))
        same_shape = replayed.shape == expected.shape
        if not same_shape or float((replayed.float() - expected.float()).abs().max()) > self.rtol * scale:
            return self._eager(key, "its replay differed from the eager model (the model keeps state "
                               "outside its tensors?)", x, t, cond, expected)
        self.graphs[key] = graph
        return expected

    def _eager(self, key, why: str, x, t, cond: dict, out: torch.Tensor | None = None) -> torch.Tensor:
        self.eager[key] = why
        warnings.warn(f"CUDA graphs: running the model eagerly for inputs of shape {tuple(x.shape)}: {why}. "
                      "Results are the same, without the graphs' speed-up; pass cuda_graphs='off' to skip them.",
                      RuntimeWarning, stacklevel=3)
        return self.model(x, t, **cond) if out is None else out


def cuda_graphs_wanted(choice: str, device: torch.device | str) -> bool:
    """`--cuda-graphs auto|on|off`: auto = on a CUDA device; on refuses other devices."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs={choice!r}: expected 'auto', 'on' or 'off'.")
    is_cuda = torch.device(device).type == "cuda"
    if choice == "on" and not is_cuda:
        raise ValueError(f"cuda_graphs='on' needs a CUDA device; this model runs on {torch.device(device)}. "
                         "Use 'auto' or 'off', or --device cuda.")
    return choice != "off" and is_cuda
