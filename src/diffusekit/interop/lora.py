"""LoRA adapters on diffusers folders, out: the file diffusers' `load_lora_weights` reads, and merged folders.

diffusers (0.42, StableDiffusionLoraLoaderMixin) reads `pytorch_lora_weights.safetensors` from a folder:
  * keys in peft's naming under the component's name: "unet.<module>.lora_A.weight" (r x in),
    "unet.<module>.lora_B.weight" (out x r), "text_encoder.<module>.lora_A.weight" ...;
  * the safetensors header's "lora_adapter_metadata": JSON of LoraConfig keyword arguments per
    component, "unet.r", "unet.lora_alpha", "unet.target_modules" (and "text_encoder.*"); without
    it diffusers takes r from the shapes and alpha = r.
We write alpha = r with the factor alpha / r folded into lora_B (B' = (alpha / r) B, so B' A = (alpha / r) B A):
the update is the same, and the file reads the same in diffusers versions without the metadata.
diffusers' own `cross_attention_kwargs={"scale": s}` is then our lora_scale s.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ConfigError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"     # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"                    # diffusers' LORA_ADAPTER_METADATA_KEY
# our module prefix -> diffusers' component name (DiffusersTextUNet: .unet, .text_encoder.model)
COMPONENTS = {"unet.": "unet", "text_encoder.model.": "text_encoder"}


def diffusers_lora_state_dict(pipe) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights with diffusers' keys and alpha / r folded into lora_B, LoraConfig metadata per component)."""
    from ..interop.text_to_image import DiffusersTextUNet
    from ..nn.lora import lora_state_dict
    adapter = getattr(pipe, "adapter", None)
    if adapter is None:
        raise ConfigError("this Pipeline has no LoRA adapter to export; load one (Pipeline.load_adapter).")
    if not isinstance(pipe.model, DiffusersTextUNet):
        raise ConfigError(f"the adapter's base is a {type(pipe.model).__name__}; diffusers' load_lora_weights reads "
                          "LoRAs of StableDiffusionPipeline folders (UNet2DConditionModel + CLIP text encoder) only. "
                          "Merge it instead (diffusekit merge) to share the fine-tuned model.")
    scaling = adapter.config.scaling
    state, targets = {}, {name: [] for name in COMPONENTS.values()}
    for key, value in lora_state_dict(pipe.model).items():
        prefix = next((p for p in COMPONENTS if key.startswith(p)), None)
        if prefix is None:
            raise ConfigError(f"adapter weight {key} is outside the UNet and the text encoder; diffusers has no "
                              "place for it.")
        name = COMPONENTS[prefix]
        module = key[len(prefix):].rsplit(".lora_", 1)[0]
        value = value.detach().float().cpu()
        state[f"{name}.{key[len(prefix):]}"] = (value * scaling if ".lora_B." in key else value).contiguous()
        targets[name].append(module)
    metadata = {}
    for name, modules in targets.items():
        if modules:
            metadata.update({f"{name}.r": adapter.config.rank, f"{name}.lora_alpha": adapter.config.rank,
                             f"{name}.target_modules": sorted(set(modules))})
    return state, metadata


def export_diffusers_lora(source, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Write a LoRA as diffusers reads it: out_dir/pytorch_lora_weights.safetensors, for
    StableDiffusionPipeline.from_pretrained(base).load_lora_weights(out_dir).

    source: a Pipeline with an adapter on a diffusers Stable-Diffusion-layout base, or an adapter folder
    (loaded on its base, or on `base`). Returns the file written.
    """
    import safetensors.torch
    from ..pipeline import Pipeline
    pipe = Pipeline.load_adapter(source, base=base, device="cpu") if isinstance(source, (str, Path)) else source
    state, metadata = diffusers_lora_state_dict(pipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LORA_WEIGHT_NAME
    if path.exists():
        raise ConfigError(f"{path} exists; give another folder (diffusekit never writes over a LoRA file).")
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt",
                                                           METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def save_merged_diffusers(pipe, base_dir: Path, out_dir: Path) -> None:
    """A diffusers folder with the (merged) UNet and text encoder of pipe, the other components copied from base_dir."""
    model = pipe.model
    resaved = {"unet": model.unet}
    text = getattr(model, "text_encoder", None)
    if text is not None and hasattr(text, "model"):
        resaved["text_encoder"] = text.model
    for entry in Path(base_dir).iterdir():
        if entry.name in resaved:
            continue
        if entry.is_dir():
            shutil.copytree(entry, out_dir / entry.name)
        else:
            shutil.copy2(entry, out_dir / entry.name)
    for name, module in resaved.items():
        module.save_pretrained(out_dir / name)
