"""LoRA adapters on any torch module, through peft (Hu et al. 2021, "LoRA", eq. 3).

A targeted layer W (Linear or Conv2d) computes W x + (alpha / r) * s * B A x, with A (r x in) and B
(out x r) the adapter, r the rank, alpha its scale and s the sampling-time `lora_scale` (0 = the
base exactly, 1 = the fine-tuned model). peft writes the layers; this module chooses where they go:

  * targets are names of groups or of layers: "attention" (the q/k/v/out projections of every
    attention module: ours, diffusers' and CLIP's), "conv" (the denoiser's Conv2d layers but the
    image-facing first and last), "text"
    (the text encoder's attention projections), or any layer name, matched as peft does (the full
    module name, or its last dotted parts: "to_q", "attn1.to_q");
  * they resolve to full module names (`lora_targets`), so what is adapted is recorded exactly and
    re-injected exactly on load; a name that matches nothing, and a rank above a layer's smallest
    dimension, are refused in one line that lists what exists.

The model's parts: a module with a `unet` child (a text-to-image model, a diffusers wrapper) has its
denoiser there; a `text_encoder` child (or its `.model`, for a diffusers CLIP wrapper) is the text encoder.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.nn.layers import RowDropout

ADAPTER_NAME = "default"           # peft's adapter name; one adapter per model here
GROUPS = ("attention", "conv", "text")
# the first and last convolutions (ours, diffusers'): they map from / to the few image channels, which
# bound their rank; the "conv" group leaves them out (name them to adapt them)
IMAGE_CONVS = ("input_conv", "out_conv", "conv_in", "conv_out")


@dataclass
class AdapterConfig(Config):
    """A LoRA adapter's shape: rank, alpha, dropout and the layers it adapts."""

    rank: int = 4                                   # r: the rank of B A
    alpha: float | None = None                      # None = rank (the update is scaled by alpha / r = 1)
    dropout: float = 0.0                            # dropout on the adapter's input, in training only
    targets: tuple[str, ...] = ("attention",)       # groups ("attention", "conv", "text") and/or layer names

    def validate(self) -> None:
        check_range("rank", self.rank, lo=1)
        if self.alpha is not None:
            check_range("alpha", self.alpha, lo=0, lo_open=True)
        check_range("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets={self.targets!r}: give one or more of {list(GROUPS)} or layer names "
                              "(for example ('attention',) or ('to_q', 'to_v')).")

    @property
    def scaling(self) -> float:
        """alpha / r: the factor on B A at lora_scale 1."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ConfigError("LoRA adapters need the peft package; pip install 'diffusekit[finetune]' "
                          "(or pip install peft).") from e
    return peft


def model_parts(model: nn.Module) -> dict[str, str | None]:
    """The module-name prefixes of the denoiser and the text encoder ("" = the model itself, None = none)."""
    children = dict(model.named_children())
    denoiser = "unet" if isinstance(children.get("unet"), nn.Module) else ""
    text = children.get("text_encoder")
    if text is None:
        return {"denoiser": denoiser, "text": None}
    inner = dict(text.named_children()).get("model")
    return {"denoiser": denoiser, "text": "text_encoder.model" if inner is not None else "text_encoder"}


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (prefix == "" or name == prefix or name.startswith(prefix + "."))


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d layer, by full name: what LoRA can target here."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))}


def _attention_projections(model: nn.Module, prefix: str | None, exclude: str | None = None) -> list[str]:
    """The Linear layers inside attention modules (ours: Attention, AttentionBlock; diffusers' Attention; CLIP's)."""
    names = []
    for name, module in model.named_modules():
        if not _under(name, prefix) or _under(name, exclude) or not type(module).__name__.endswith(
                ("Attention", "AttentionBlock")):
            continue
        names += [f"{name}.{sub}" for sub, m in module.named_modules() if sub and isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


def _group(model: nn.Module, group: str, layers: dict[str, nn.Module]) -> list[str]:
    parts = model_parts(model)
    text = parts["text"]
    if group == "text":
        if text is None:
            raise ConfigError(f"targets has 'text' but this {type(model).__name__} has no text encoder among its "
                              "modules (a model without text has none; a frozen pretrained one is kept outside "
                              "them); drop 'text' from the targets.")
        return _attention_projections(model, text)
    if group == "attention":
        return _attention_projections(model, parts["denoiser"], exclude=text)
    return [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and _under(n, parts["denoiser"])
            and not _under(n, text) and n.rsplit(".", 1)[-1] not in IMAGE_CONVS]


def _short(name: str) -> str:
    """A layer's own name, with its container's when that is a bare index ("mlp.0", "to_out.0")."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _no_match(model: nn.Module, target: str, layers: dict[str, nn.Module]) -> ConfigError:
    kinds: dict[str, list[str]] = {}
    for name, m in layers.items():
        kinds.setdefault(type(m).__name__, []).append(_short(name))
    have = "; ".join(f"{k}: {', '.join(dict.fromkeys(v))}" for k, v in kinds.items())
    names = [_short(n) for n in layers] + list(GROUPS)
    hint = difflib.get_close_matches(target, names, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"LoRA target {target!r} matches no layer of this {type(model).__name__}{extra}; it has "
                       f"the groups {list(GROUPS)} and the layers {have}.")


def _smallest_dimension(layer: nn.Module) -> tuple[int, str]:
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features), f"Linear {layer.in_features} -> {layer.out_features}"
    k = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return min(k, layer.out_channels), (f"Conv2d {layer.in_channels} -> {layer.out_channels}, "
                                        f"kernel {tuple(layer.kernel_size)}")


def lora_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The full names of the layers `config.targets` selects in model, checked against its rank."""
    layers = _adaptable(model)
    names: list[str] = []
    for target in config.targets:
        if target in GROUPS:
            found = _group(model, target, layers)
        else:
            found = [n for n in layers if n == target or n.endswith("." + target)]
        if not found:
            raise _no_match(model, target, layers)
        names += found
    names = list(dict.fromkeys(names))
    for name in names:
        smallest, what = _smallest_dimension(layers[name])
        if config.rank > smallest:
            raise ConfigError(f"rank={config.rank} is larger than {name}'s smallest dimension ({smallest}: {what}); "
                              f"use rank <= {smallest}, or leave that layer out of the targets.")
    return names


def add_lora(model: nn.Module, config: AdapterConfig, target_modules: list[str] | None = None) -> list[str]:
    """Inject a LoRA adapter into model in place (B = 0: the model computes what it did); returns the targets.

    Only the adapter's parameters require grad afterwards. target_modules (full names, as `lora_targets`
    returns them) skips the resolution: an adapter loaded back adapts exactly the layers it was saved from.
    """
    peft = _peft()
    if has_lora(model):
        raise ConfigError("this model already has a LoRA adapter; merge it (merge_lora) or load the base again.")
    names = list(target_modules) if target_modules is not None else lora_targets(model, config)
    missing = sorted(set(names) - set(_adaptable(model)))
    if missing:
        raise ConfigError(f"the adapter targets layers this {type(model).__name__} does not have ({missing[:3]}...); "
                          "it was made for another base model.")
    peft_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha if config.alpha is not None else config.rank,
                                  lora_dropout=config.dropout, target_modules=names, bias="none")
    peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    _row_dropout(model)
    if any(n.rsplit(".", 1)[-1] in ("emb_proj", "ctx_proj") for n in names):
        for m in model.modules():      # UNet.project_all reads the raw weights, which would skip the adapter
            if hasattr(m, "batch_projections"):
                m.batch_projections = False
    return names


def _row_dropout(model: nn.Module) -> None:
    """peft's adapter dropout (nn.Dropout) as RowDropout: the same layer outside training, and inside the trainers'
    row_dropout_seeds its masks depend on (seed, step, layer, global row) only, so torchrun ranks drop what one
    process drops and a resumed fine-tune what an uninterrupted one drops."""
    for _, layer in _lora_layers(model):
        drop = layer.lora_dropout[ADAPTER_NAME]
        if isinstance(drop, nn.Dropout) and not isinstance(drop, RowDropout):
            layer.lora_dropout[ADAPTER_NAME] = RowDropout(drop.p)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:                 # without peft no model has LoRA layers
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether model holds LoRA layers (peft's)."""
    return bool(_lora_layers(model))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights only, peft's keys without the adapter name ("x.to_q.lora_A.weight")."""
    return _peft().get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str = "the adapter") -> None:
    """Load adapter weights into model's LoRA layers; every layer gets weights and every weight a layer."""
    result = _peft().set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit this model's LoRA layers: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}; it was saved from another base or another adapter config.")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters (what a LoRA optimizer steps)."""
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter's update by `scale`: 0 = the base exactly (adapters off), 1 = the fine-tuned model."""
    check_range("lora_scale", scale)
    layers = _lora_layers(model)
    if not layers:
        raise ConfigError("lora_scale was given but this model has no LoRA adapter; load one "
                          "(Pipeline.load_adapter) or drop lora_scale.")
    for _, layer in layers:
        layer.enable_adapters(scale != 0)          # 0: skip the adapter, so the base runs bit for bit
        layer.set_scale(ADAPTER_NAME, float(scale))


def get_lora_scale(model: nn.Module) -> float | None:
    """The current lora_scale (None without an adapter)."""
    layers = _lora_layers(model)
    if not layers:
        return None
    layer = layers[0][1]
    if layer.disable_adapters:
        return 0.0
    return layer.scaling[ADAPTER_NAME] / (layer.lora_alpha[ADAPTER_NAME] / layer.r[ADAPTER_NAME])


@torch.no_grad()
def merge_lora(model: nn.Module, scale: float | None = None) -> nn.Module:
    """Fold the adapter into the base weights in place (W + s (alpha / r) B A) and remove the LoRA layers.

    scale: the lora_scale to fold in (None = the current one). The model is then a plain model of the
    base's architecture, with its parameter names; returns it.
    """
    if scale is not None:
        set_lora_scale(model, scale)
    for name, layer in _lora_layers(model):
        if not layer.disable_adapters:
            layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.peft_config
    return model


def parameter_count(model: nn.Module, adapter: bool) -> int:
    """Parameters of the adapter (adapter=True) or of the base (False) in model."""
    return sum(p.numel() for n, p in model.named_parameters() if (".lora_" in n) == adapter)
