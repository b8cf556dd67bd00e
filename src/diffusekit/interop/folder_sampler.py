"""A diffusers folder's scheduler as the default sampler of its Pipeline, and what carries over to another.

The rule for another sampler is diffusers' own: `OtherScheduler.from_config(folder_config)` keeps
every key the other class has (spacing, steps_offset, set_alpha_to_one, clip_sample, thresholding,
variance_type, Karras sigmas, ...) and ignores the rest. So choosing, say, "euler" on a DDIM
folder keeps its spacing and offset and drops its clip_sample; a note names what was dropped.
A sampler without a diffusers class (dpmpp_3m_sde) keeps the spacing and offset only.
"""
from __future__ import annotations

from .schedulers import SCHEDULE_KEYS, SPECS, check_config_keys, class_keys, sampler_from_diffusers_config

# the folder settings a note reports when they do not carry over, with the values at which they do nothing
_INERT = {"clip_sample": (False,), "thresholding": (False,), "set_alpha_to_one": (True,),
          "variance_type": (None, "fixed_small", "fixed_small_log"), "use_karras_sigmas": (False,),
          "rescale_betas_zero_snr": (False,), "timestep_spacing": ("linspace",), "steps_offset": (0,)}
_GENERIC = {"prediction_type", "timestep_spacing", "steps_offset"}


def folder_sampler(cfg: dict, sampler: str | None = None) -> tuple[str, dict, str]:
    """(sampler name, Sampler options, note) for sampling from a folder whose scheduler config is cfg.

    sampler=None: the folder's own scheduler, converted exactly (a ConfigError names any option
    without a diffusekit counterpart, and its fix). A named sampler: the folder's settings that its
    diffusers class has (module docstring). note is one line naming the folder's settings that act
    and do not carry over, "" when none. The prediction type is not among the options (a Pipeline
    has its own).
    """
    if sampler is None:
        name, kwargs = sampler_from_diffusers_config(cfg)
        kwargs.pop("prediction_type", None)
        return name, kwargs, ""
    source = str(cfg.get("_class_name") or "?")
    mapped = any(s.class_name == source for s in SPECS)
    if mapped:
        check_config_keys(cfg)               # unknown keys are refused whatever sampler runs
    target = next((s for s in SPECS if s.sampler == sampler), None)
    own = class_keys(target) if target is not None else set(SCHEDULE_KEYS) | _GENERIC
    # the Pipeline owns the prediction type (diffusers' class may step it differently, ours converts it)
    carried = {k: v for k, v in cfg.items() if not k.startswith("_") and k in own and k != "prediction_type"}
    if target is None:
        kwargs = {k: carried[k] for k in ("timestep_spacing",) if k in carried}
        if kwargs.get("timestep_spacing") == "leading" and carried.get("steps_offset"):
            kwargs["steps_offset"] = carried["steps_offset"]
    else:
        carried = {k: v for k, v in carried.items() if k not in target.required}
        _, kwargs = sampler_from_diffusers_config({**carried, **target.required, "_class_name": target.class_name})
        kwargs.pop("prediction_type", None)
    lost = [f"{k}={v!r}" for k, v in cfg.items() if k in _INERT and k not in own and v not in _INERT[k]]
    notes = [] if mapped else [f"the folder's {source} has no diffusekit counterpart: its betas, spacing and offset "
                               f"carry over to sampler {sampler!r}, its own stepping does not"]
    if lost:
        why = f"{target.class_name} has no such option" if target is not None else "it has no diffusers class"
        notes.append(f"the folder's {source} settings {', '.join(lost)} do not carry over to sampler {sampler!r} "
                     f"({why}); sampling without them")
    note = "; ".join(notes) + ("." if notes else "")
    return sampler, kwargs, note


def inversion_options(cfg: dict | None) -> dict:
    """The DDIM plan options that DDIM inversion and reconstruction take from a folder whose scheduler config is
    cfg (None: a run, none): timestep_spacing, steps_offset, set_alpha_to_one, as folder_sampler(cfg, "ddim")
    gives them. Its x0 bounds (clip_sample, thresholding) are left out: inversion steps with eps alone, and a
    reconstruction that bounded x0_pred would not undo it."""
    if cfg is None:
        return {}
    _, kwargs, _ = folder_sampler(cfg, "ddim")
    return {k: v for k, v in kwargs.items() if k in ("timestep_spacing", "steps_offset", "set_alpha_to_one")}
