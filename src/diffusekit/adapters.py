"""A LoRA adapter on a Pipeline's model, saved apart from its base and checked against it on load.

An adapter folder holds
  adapter.safetensors  the adapter's weights only (peft keys: "unet.x.to_q.lora_A.weight", ...)
  adapter.json         {"format", "adapter": AdapterConfig, "targets": [full layer names],
                        "base": {"path", "relative_path", "kind", "weights", "sha256", "parameters"},
                        "weights_file": "adapter.safetensors" (a trainer may point it at its model.safetensors),
                        "size": {"adapter_parameters", "base_parameters", "adapter_bytes", "base_bytes", "fraction"}}
The base is a diffusekit run or a local diffusers folder. Its reference is its absolute path (and the
path relative to the adapter folder, tried second, so a tree moved as a whole still loads) and
`content_hash` of its weights (the model's, then the autoencoder's; LoRA layers read as the base
layers they wrap). `load_adapter` refuses a base whose hash changed and a base that is not there,
and `base=` points at it again. The layers themselves: nn/lora.py (peft).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import content_hash, read_weights, write_text_atomic, write_weights_atomic
from .config import ConfigError
from .nn.lora import (AdapterConfig, add_lora, has_lora, load_lora_state_dict, lora_state_dict, merge_lora,
                      parameter_count)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "diffusekit-lora/1"


@dataclass
class Adapter:
    """What a Pipeline knows of its adapter: its config, the layers it adapts and its base's reference."""

    config: AdapterConfig
    targets: list[str]
    base: dict = field(default_factory=dict)   # path, relative_path, kind, weights, sha256, parameters


def is_adapter_folder(path: str | Path) -> bool:
    """Whether path is an adapter folder (adapter.json beside its weights)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The base's weights, LoRA or not: model.* (LoRA layers read as their base layers) and autoencoder.*."""
    state = {f"model.{k.replace('.base_layer.', '.')}": v for k, v in pipe.model.state_dict().items()
             if ".lora_" not in k}
    if pipe.autoencoder is not None:
        state.update({f"autoencoder.{k}": v for k, v in pipe.autoencoder.state_dict().items()})
    return state


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


def adapter_size(pipe) -> dict:
    """The adapter's size against its base's (the model's weights): parameters, bytes and their fraction."""
    model = pipe.model
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    return {"adapter_parameters": parameter_count(model, adapter=True),
            "base_parameters": parameter_count(model, adapter=False),
            "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
            "fraction": adapter_bytes / base_bytes if base_bytes else float("nan")}


def _require_adapter(pipe) -> Adapter:
    adapter = getattr(pipe, "adapter", None)
    if adapter is None or not has_lora(pipe.model):
        raise ConfigError("this Pipeline has no LoRA adapter; add one (adapters.add_adapter) or load one "
                          "(Pipeline.load_adapter).")
    return adapter


def adapter_record(pipe, out_dir: str | Path, weights_file: str = ADAPTER_WEIGHTS) -> dict:
    """adapter.json's content for pipe's adapter saved in out_dir, its weights in out_dir/weights_file.

    A trainer that writes the adapter's weights through its own checkpoint journal (EMA as model.safetensors)
    writes this record beside them with weights_file="model.safetensors"."""
    adapter = _require_adapter(pipe)
    base = {**adapter.base, "relative_path": os.path.relpath(adapter.base["path"], Path(out_dir).resolve())}
    return {"format": FORMAT, "adapter": adapter.config.to_dict(), "targets": adapter.targets, "base": base,
            "weights_file": weights_file, "size": adapter_size(pipe)}


def save_adapter(pipe, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """Write pipe's adapter (weights only + adapter.json with its base's reference) to out_dir; returns its size.

    state_dict: the adapter weights to write (lora_state_dict's keys, e.g. their EMA); default the model's."""
    out_dir = Path(out_dir)
    record = adapter_record(pipe, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights_atomic(out_dir / ADAPTER_WEIGHTS, state_dict if state_dict is not None else
                         lora_state_dict(pipe.model), {"format": "pt"})
    write_text_atomic(out_dir / ADAPTER_CONFIG, json.dumps(record, indent=2) + "\n")
    return record["size"]


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter.json as a dict, the adapter's weights) of an adapter folder; errors name the missing piece."""
    path = Path(path)
    if not is_adapter_folder(path):
        raise ConfigError(f"{path} is not a LoRA adapter folder: it has no {ADAPTER_CONFIG}. Give the folder "
                          "save_adapter (or diffusekit finetune --method lora) wrote.")
    try:
        record = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / ADAPTER_CONFIG} is not valid JSON ({e.msg} at line {e.lineno}); the adapter "
                          "folder is damaged: write it again.") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ConfigError(f"{path / ADAPTER_CONFIG} is not a {FORMAT} adapter record (format="
                          f"{record.get('format') if isinstance(record, dict) else None!r}).")
    weights_file = record.get("weights_file", ADAPTER_WEIGHTS)
    if not isinstance(weights_file, str) or Path(weights_file).name != weights_file:
        raise ConfigError(f"{path / ADAPTER_CONFIG} names weights_file={weights_file!r}; it must be a file name in "
                          "the adapter folder.")
    state, _ = read_weights(path / weights_file)
    return record, state


def resolve_base(path: str | Path, record: dict, base: str | Path | None = None) -> Path:
    """The base folder an adapter refers to: `base` when given, else its recorded path (or relative path)."""
    if base is not None:
        if not Path(base).exists():
            raise ConfigError(f"base={base} does not exist; give the run or diffusers folder the adapter was "
                              "trained on.")
        return Path(base)
    ref = record["base"]
    for candidate in (Path(ref["path"]), Path(path) / ref.get("relative_path", "\0")):
        if candidate.exists():
            return candidate
    raise ConfigError(f"the adapter {path} was trained on {ref['path']}, which is not there any more (moved or "
                      "deleted); pass base=NEW_PATH (--base NEW_PATH) to point at it.")


def load_adapter(path: str | Path, base: str | Path | None = None, device="auto", precision: str = "fp32"):
    """The adapter folder at path on its base, as a Pipeline at lora_scale 1 (pipe.adapter set).

    The base (a run or a diffusers folder) is the recorded one, or `base`; its weights must hash to
    what the adapter was trained on, else ConfigError says which folder changed and how to point at another.
    """
    from .interop.diffusers import is_diffusers_folder
    from .pipeline import Pipeline
    record, state = read_adapter(path)
    base_dir, ref = resolve_base(path, record, base), record["base"]
    if is_diffusers_folder(base_dir):
        pipe = Pipeline.from_diffusers(base_dir, device=device, precision=precision)
    else:
        pipe = Pipeline.load(base_dir, device=device, weights=ref.get("weights") or "ema", precision=precision)
    found = content_hash(base_state_dict(pipe))
    if found != ref["sha256"]:
        raise ConfigError(f"the base {base_dir} has changed since the adapter {path} was trained: its weights hash "
                          f"{found[:12]}, the adapter expects {ref['sha256'][:12]}; pass base= (--base) the model it "
                          "was trained on.")
    config = AdapterConfig.from_dict(record["adapter"])
    targets = add_lora(pipe.model, config, target_modules=record["targets"])
    load_lora_state_dict(pipe.model, {k: v.to(pipe.device) for k, v in state.items()},
                         where=str(Path(path) / record.get("weights_file", ADAPTER_WEIGHTS)))
    pipe.model.eval()
    pipe.adapter = Adapter(config, targets, {**ref, "path": str(Path(base_dir).resolve())})
    return pipe


def merge_adapter(pipe, scale: float | None = None):
    """Fold pipe's adapter into its base weights in place (at `scale`, default the current lora_scale)."""
    _require_adapter(pipe)
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
    adapter = _require_adapter(pipe)
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
    from .checkpoint import EMA_FILE, RAW_FILE
    weights = EMA_FILE if adapter.base.get("weights", "ema") == "ema" else RAW_FILE
    _, metadata = read_weights(base_dir / weights, verify=False)
    shutil.copy2(base_dir / "config.json", out_dir / "config.json")
    if (base_dir / "autoencoder").is_dir():
        shutil.copytree(base_dir / "autoencoder", out_dir / "autoencoder")
    state = {k: v.detach().cpu().contiguous() for k, v in pipe.model.state_dict().items()}
    write_weights_atomic(out_dir / EMA_FILE, state, {**metadata, "weights": "ema", **note})
    return out_dir
