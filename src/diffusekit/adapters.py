"""LoRA adapters on a Pipeline: add one, save it apart from its base, merge it, write the merged model.

The adapter folder (adapter.json + weights, the base's reference and hash check) is storage:
store/adapter.py, whose public names are importable from here too. Opening an adapter folder on its
base is `Pipeline.load_adapter` (also `load_adapter` here). The layers themselves: nn/lora.py (peft).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError
from .nn.lora import AdapterConfig, add_lora, lora_state_dict, merge_lora, parameter_count
from .store.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, Adapter, adapter_record, adapter_size,
                            base_state_dict, is_adapter_folder, read_adapter, require_adapter, resolve_base,
                            write_adapter)
from .store.files import content_hash, read_weights, write_weights_atomic
from .store.journal import EMA_FILE, RAW_FILE

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FORMAT", "Adapter", "adapter_record", "adapter_size", "add_adapter",
           "base_reference", "base_state_dict", "is_adapter_folder", "load_adapter", "merge_adapter", "read_adapter",
           "refresh_fast_paths", "resolve_base", "save_adapter", "write_merged"]


def base_reference(pipe, weights: str = "ema") -> dict:
    """The reference an adapter keeps to the pipeline's base: where it is, what kind, and its weights' hash."""
    from .interop.diffusers import is_diffusers_folder
    if not pipe.source or not Path(pipe.source).exists():
        raise ConfigError("this Pipeline was not loaded from a folder (Pipeline.load or Pipeline.from_diffusers), so "
                          "an adapter on it could not find its base again; load the base from its folder first.")
    kind = "diffusers" if is_diffusers_folder(pipe.source) else "run"
    return {"path": str(Path(pipe.source).resolve()), "kind": kind, "weights": weights if kind == "run" else "",
            "sha256": content_hash(base_state_dict(pipe)), "parameters": parameter_count(pipe.model, adapter=False)}


def add_adapter(pipe, config: AdapterConfig, weights: str = "ema") -> Adapter:
    """Put a fresh LoRA adapter (B = 0) on pipe.model in place and remember its base; returns pipe.adapter.

    weights: which of a run's weights the base is ("ema" or "raw", as for Pipeline.load).
    """
    base = base_reference(pipe, weights)       # before the layers change
    targets = add_lora(pipe.model, config)
    pipe.adapter = Adapter(config, targets, base)
    refresh_fast_paths(pipe)
    return pipe.adapter


def refresh_fast_paths(pipe) -> None:
    """Compile and record the network call again where it was: its layers were just replaced."""
    if pipe.compiled is not None:
        pipe.compile("on")
    if pipe.graphed is not None:
        pipe.use_cuda_graphs("on")


def save_adapter(pipe, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """Write pipe's adapter (weights only + adapter.json with its base's reference) to out_dir; returns its size.

    state_dict: the adapter weights to write (lora_state_dict's keys, e.g. their EMA); default the model's."""
    record = adapter_record(pipe, out_dir)
    write_adapter(out_dir, record, state_dict if state_dict is not None else lora_state_dict(pipe.model))
    return record["size"]


def load_adapter(path: str | Path, base: str | Path | None = None, device="auto", precision: str = "auto"):
    """The adapter folder at path on its base, as a Pipeline at lora_scale 1: `Pipeline.load_adapter`."""
    from .pipeline import Pipeline
    return Pipeline.load_adapter(path, base=base, device=device, precision=precision)


def merge_adapter(pipe, scale: float | None = None):
    """Fold pipe's adapter into its base weights in place (at `scale`, default the current lora_scale)."""
    require_adapter(pipe)
    merge_lora(pipe.model, scale)
    pipe.adapter = None
    refresh_fast_paths(pipe)
    return pipe


def _empty_out(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not an empty folder; give a new folder for the merged model "
                          "(diffusekit never writes over what it did not write).")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_merged(pipe, out_dir: str | Path, scale: float | None = None) -> Path:
    """Fold pipe's adapter into its base (in place, at `scale`, default the current lora_scale) and write a
    plain model of the base's kind to out_dir: a run folder (config.json, model.safetensors, autoencoder/)
    or a diffusers folder (the adapted components re-saved, the others copied). Pipeline.load /
    Pipeline.from_diffusers read it with no adapter and no peft."""
    import shutil
    adapter = require_adapter(pipe)
    base_dir, out_dir = Path(adapter.base["path"]), _empty_out(Path(out_dir))
    scale = pipe.lora_scale if scale is None else scale
    merge_adapter(pipe, scale)
    note = {"merged_adapter": json.dumps({"adapter": adapter.config.to_dict(), "lora_scale": scale,
                                          "base_sha256": adapter.base["sha256"]})}
    if adapter.base["kind"] == "diffusers":
        from .interop.lora import save_merged_diffusers
        save_merged_diffusers(pipe, base_dir, out_dir)
        (out_dir / "merged_adapter.json").write_text(note["merged_adapter"] + "\n")
        return out_dir
    weights = EMA_FILE if adapter.base.get("weights", "ema") == "ema" else RAW_FILE
    _, metadata = read_weights(base_dir / weights, verify=False)
    shutil.copy2(base_dir / "config.json", out_dir / "config.json")
    if (base_dir / "autoencoder").is_dir():
        shutil.copytree(base_dir / "autoencoder", out_dir / "autoencoder")
    state = {k: v.detach().cpu().contiguous() for k, v in pipe.model.state_dict().items()}
    write_weights_atomic(out_dir / EMA_FILE, state, {**metadata, "weights": "ema", **note})
    return out_dir
