"""Loading one component of a diffusers folder (unet/, vae/), with errors that name the file and the fix.

diffusers' own errors answer several different problems with one text ("Unable to load weights
from checkpoint file") or suggest keyword arguments a CLI user cannot pass (low_cpu_mem_usage=False);
and a weights file that lacks a key leaves that parameter on the meta device, which fails much
later as "Cannot copy out of meta tensor". Here each problem gets its own ConfigError:
  - a weights file that lacks keys the component's config.json builds (named, with the class);
  - a weight whose shape differs from what config.json builds;
  - a truncated or damaged safetensors file;
  - a pickle .bin that holds more than tensors: we load .bin files with weights_only=True only,
    never by unpickling arbitrary objects, and say how to convert the file to safetensors.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..config import ConfigError

SAFETENSORS = "diffusion_pytorch_model.safetensors"
PICKLE = "diffusion_pytorch_model.bin"
_RESAVE = "copy the folder again, or re-save the pipeline with save_pretrained"


def load_component(cls, path: Path, subfolder: str):
    """cls.from_pretrained(path, subfolder=...) with every weight checked present and of the right shape."""
    try:
        model, info = cls.from_pretrained(path, subfolder=subfolder, low_cpu_mem_usage=_low_memory(),
                                          output_loading_info=True)
    except ValueError as e:
        shape = re.search(r"because (\S+) expected shape (torch\.Size\(\[[^\]]*\]\)), but got (torch\.Size\(\[[^\]]*\]\))",
                          str(e))
        if shape is None:
            raise
        key, wanted, got = shape.groups()
        raise ConfigError(f"{_weights_file(path / subfolder)}: weight {key} has shape {_dims(got)} but "
                          f"{subfolder}/config.json builds a {cls.__name__} that needs {_dims(wanted)}; the weights "
                          f"and config.json were saved from different models: put the config.json saved with "
                          f"these weights beside them, or {_RESAVE}.") from None
    except OSError as e:
        raise ConfigError(_unreadable(path / subfolder, e)) from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        total = sum(1 for _ in model.state_dict())
        raise ConfigError(f"{_weights_file(path / subfolder)} lacks {len(missing)} of the {total} weights of the "
                          f"{cls.__name__} that {subfolder}/config.json builds: {shown}; the file is incomplete or "
                          f"was saved from a different model than that config.json: {_RESAVE}.")
    return model


def _low_memory() -> bool:
    # without accelerate, diffusers would print a notice on every load; its plain loading path is the same
    return importlib.util.find_spec("accelerate") is not None


def _weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS, PICKLE):
        if (folder / name).is_file():
            return folder / name
    return folder


def _dims(size: str) -> str:
    return "[" + size.removeprefix("torch.Size([").removesuffix("])") + "]"


def _unreadable(folder: Path, e: OSError) -> str:
    """Why the weights of one component folder could not be read, and what to do."""
    safetensors, pickle = folder / SAFETENSORS, folder / PICKLE
    if safetensors.is_file():
        problem = _safetensors_problem(safetensors)
        if problem:
            return (f"{safetensors} is not a complete safetensors file ({problem}); it was cut short or damaged "
                    f"in copying: {_RESAVE}.")
    elif pickle.is_file():
        problem = _pickle_problem(pickle)
        if problem:
            return (f"{pickle} is a pickle file that holds more than tensors ({problem}); diffusekit loads .bin "
                    "weights with torch.load(weights_only=True) only and never unpickles other objects, since "
                    "unpickling can run any code. If you trust the file, convert it to safetensors where you "
                    f"trust it: {_convert_hint(folder)}, then delete the .bin.")
    return f"{folder}: the weights could not be read ({e}); {_RESAVE}."


def _safetensors_problem(path: Path) -> str:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:          # safetensors raises its own SafetensorError for every kind of damage
        return f"{e}; {path.stat().st_size} bytes"
    return ""


def _pickle_problem(path: Path) -> str:
    import pickle

    import torch
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        return f"it needs {found.group(1)}" if found else "torch.load(weights_only=True) refuses it"
    except Exception as e:          # not a pickle at all: empty, truncated, another format
        return f"not a readable torch file: {type(e).__name__}: {str(e)[:200]}"
    return ""


def _convert_hint(folder: Path) -> str:
    # weights_only=False is exactly the unpickling we refuse: the user runs it, knowing the file
    bin_file, out = folder / PICKLE, folder / SAFETENSORS
    return (f"python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{bin_file}', weights_only=False); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\"")


def load_safetensors_into(model, file: Path, built_from: str) -> None:
    """model.load_state_dict(safetensors file), refusing a damaged file or one whose keys or shapes differ,
    with an error that names the file, the keys and what the model was built from (`built_from`)."""
    from safetensors.torch import load_file
    problem = _safetensors_problem(file)
    if problem:
        raise ConfigError(f"{file} is not a complete safetensors file ({problem}); it was cut short or damaged in "
                          "copying: copy the folder again, or export the run again.")
    found, expected = load_file(str(file)), model.state_dict()
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {list(found[k].shape)} (needs {list(v.shape)})" for k, v in expected.items()
              if k in found and found[k].shape != v.shape]
    problems = [f"{what}: {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise ConfigError(f"{file} does not fit the model built from {built_from} ({'; '.join(problems)}); the "
                          "weights and the config come from different models or the file is incomplete: copy the "
                          "folder again, or export the run again.")
    model.load_state_dict(found, strict=True)
