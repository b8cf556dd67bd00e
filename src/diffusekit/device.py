"""Where tensors live and in what precision: one device picker, one autocast, one rank/world reader.

Every command and every library entry point that runs a network takes `device="auto"` (CUDA, then
Apple's MPS, then the CPU) and `precision="auto" | "fp32" | "bf16" | "fp16"` (autocast of the network call;
fp16 training adds a gradient scaler; "auto" is bf16 where the device multiplies bf16 natively,
else fp32: `resolve_precision`). Noise is always drawn on the generator's device and then
moved (`randn`), so a CPU generator drives a CUDA run reproducibly and vice versa.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Literal

import torch

from .config import ConfigError, check_choice

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def module_device(model) -> torch.device:
    """Where a module's first parameter (or buffer) lies; cpu for a plain callable or a module without tensors."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch.device for "auto" (cuda > mps > cpu), a name, "cuda:1", or a torch.device."""
    if isinstance(device, torch.device):
        return device
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind = name.split(":")[0]
    check_choice("device", kind, DEVICES)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use --device auto or cpu "
                          f"(or install a CUDA build of torch: TORCH_SPEC in scripts/setup.sh).")
    if kind == "mps" and not _mps_available():
        raise ConfigError(f"device={name!r} but MPS (Apple GPU) is not available here; use --device auto or cpu.")
    return torch.device(name)


def check_precision(precision: str, device: torch.device | None = None) -> str:
    """Validate a precision name (and that the device can run it)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp16" and device is not None and device.type == "cpu":
        raise ConfigError("precision='fp16' is for GPUs; on the CPU use 'bf16' (native on recent x86 "
                          "CPUs) or 'fp32'.")
    return precision


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision: "auto" -> `default_precision(device)`, the others as they are (validated)."""
    check_precision(precision)
    return default_precision(device) if precision == "auto" else precision


def autocast(device: torch.device | str, precision: str):
    """Autocast of the network call for bf16/fp16 ("auto": see resolve_precision); a no-op context for fp32."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> "torch.amp.GradScaler":
    """A gradient scaler that is active only for fp16 training (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def randn(shape, generator: torch.Generator | None, device: torch.device | str, dtype=torch.float32):
    """Standard normal noise drawn on the generator's device, then moved to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded torch.Generator on `device` (CPU generators keep results equal across devices)."""
    return torch.Generator(device).manual_seed(int(seed))


def rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torch.distributed if initialised, else torchrun's environment."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX-BF16.

    CPUs without them run bf16 autocast through fp32 conversions, usually slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":      # emulated bf16 (pre-Ampere GPUs) does not count
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def default_precision(device: torch.device | str = "cpu") -> str:
    """"bf16" where the device multiplies bf16 natively (`has_native_bf16`), else "fp32"."""
    return "bf16" if has_native_bf16(device) else "fp32"
