"""A LoRA adapter folder on disk: its record, its weights, and the reference to (and hash check of) its base.

An adapter folder holds
  adapter.safetensors  the adapter's weights only (peft keys: "unet.x.to_q.lora_A.weight", ...)
  adapter.json         {"format", "adapter": AdapterConfig, "targets": [full layer names],
                        "base": {"path", "relative_path", "kind", "weights", "sha256", "parameters"},
                        "weights_file": "adapter.safetensors" (a trainer may point it at its model.safetensors),
                        "size": {"adapter_parameters", "base_parameters", "adapter_bytes", "base_bytes", "fraction"}}
The base is a diffusekit run or a local diffusers folder. Its reference is its absolute path (and the
path relative to the adapter folder, tried second, so a tree moved as a whole still loads) and
`content_hash` of its weights (the model's, then the autoencoder's; LoRA layers read as the base
layers they wrap). `check_base` refuses a base whose hash changed, `resolve_base` a base that is not
there, and `base=` points at it again. The layers themselves: nn/lora.py (peft). Opening the base as a
Pipeline is `Pipeline.load_adapter`; adding, merging and writing merged models is adapters.py.

The functions here take any object with the Pipeline's `model`, `autoencoder`, `adapter` and `device`
attributes; storage never imports the Pipeline.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusekit.config import ConfigError
from diffusekit.nn.lora import AdapterConfig, add_lora, has_lora, load_lora_state_dict, parameter_count
from diffusekit.store.files import content_hash, read_weights, write_text_atomic, write_weights_atomic

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


def adapter_size(pipe) -> dict:
    """The adapter's size against its base's (the model's weights): parameters, bytes and their fraction."""
    model = pipe.model
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    return {"adapter_parameters": parameter_count(model, adapter=True),
            "base_parameters": parameter_count(model, adapter=False),
            "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
            "fraction": adapter_bytes / base_bytes if base_bytes else float("nan")}


def require_adapter(pipe) -> Adapter:
    """pipe's adapter; ConfigError saying how to get one when it has none."""
    adapter = getattr(pipe, "adapter", None)
    if adapter is None or not has_lora(pipe.model):
        raise ConfigError("this Pipeline has no LoRA adapter; add one (adapters.add_adapter) or load one "
                          "(Pipeline.load_adapter).")
    return adapter


def adapter_record(pipe, out_dir: str | Path, weights_file: str = ADAPTER_WEIGHTS) -> dict:
    """adapter.json's content for pipe's adapter saved in out_dir, its weights in out_dir/weights_file.

    A trainer that writes the adapter's weights through its own checkpoint journal (EMA as model.safetensors)
    writes this record beside them with weights_file="model.safetensors"."""
    adapter = require_adapter(pipe)
    base = {**adapter.base, "relative_path": os.path.relpath(adapter.base["path"], Path(out_dir).resolve())}
    return {"format": FORMAT, "adapter": adapter.config.to_dict(), "targets": adapter.targets, "base": base,
            "weights_file": weights_file, "size": adapter_size(pipe)}


def write_adapter(out_dir: str | Path, record: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Write an adapter folder: its weights (atomically, as ADAPTER_WEIGHTS), then adapter.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights_atomic(out_dir / ADAPTER_WEIGHTS, state_dict, {"format": "pt"})
    write_text_atomic(out_dir / ADAPTER_CONFIG, json.dumps(record, indent=2) + "\n")


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


def check_base(pipe, base_dir: str | Path, path: str | Path, record: dict) -> None:
    """Refuse a base (opened as pipe from base_dir) whose weights do not hash to what the adapter at path
    was trained on, naming the folder that changed and how to point at another."""
    found, expected = content_hash(base_state_dict(pipe)), record["base"]["sha256"]
    if found != expected:
        raise ConfigError(f"the base {base_dir} has changed since the adapter {path} was trained: its weights hash "
                          f"{found[:12]}, the adapter expects {expected[:12]}; pass base= (--base) the model it "
                          "was trained on.")


def attach_adapter(pipe, base_dir: str | Path, path: str | Path, record: dict,
                   state: dict[str, torch.Tensor]) -> Adapter:
    """Put the adapter read from path (read_adapter's record and weights) on pipe.model, the base opened from
    base_dir, after check_base; sets and returns pipe.adapter."""
    check_base(pipe, base_dir, path, record)
    config = AdapterConfig.from_dict(record["adapter"])
    targets = add_lora(pipe.model, config, target_modules=record["targets"])
    load_lora_state_dict(pipe.model, {k: v.to(pipe.device) for k, v in state.items()},
                         where=str(Path(path) / record.get("weights_file", ADAPTER_WEIGHTS)))
    pipe.model.eval()
    pipe.adapter = Adapter(config, targets, {**record["base"], "path": str(Path(base_dir).resolve())})
    return pipe.adapter
