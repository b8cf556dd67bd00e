"""diffusers scheduler configs <-> diffusekit schedules and sampler options (the class table: scheduler_table.py).

A diffusers scheduler config mixes two things that diffusekit keeps apart: the forward process
(betas: `NoiseSchedule`) and how to walk it back (a sampler from the registry with its spacing,
prediction type and options). Both directions are strict: an option value that selects a
behaviour diffusekit does not have is a ConfigError naming the option, never dropped.

Keys that diffusers itself ignores for a class are ignored here too: an option of another mapped
class (diffusers' from_config keeps them, e.g. skip_prk_steps and set_alpha_to_one in an Euler
config made from Stable Diffusion's PNDM one, clip_sample in SD 1.x's PNDM config) and keys that act
only with a switch that is off (dynamic_thresholding_ratio and sample_max_value without
thresholding, clip_sample_range without clip_sample). The one exception is
rescale_betas_zero_snr=True on a class without it (Heun, DEIS, PNDM): diffusers would sample the
un-rescaled betas, which is not what such a config asks for, so it is an error. A key no mapped
class has is an error.

Deliberate differences that no option selects (so they do not raise), see docs/INTEROP.md: DDIM
with "linspace" spacing steps to the next grid point (diffusers: t - T // n); a deis sampler of our
own lands on x0_pred, and exports to DEIS (which stops at sigma(t = 0)) with that last-step difference.
"""
from __future__ import annotations

import difflib

import torch

from ..config import ConfigError
from ..samplers import SAMPLERS, Sampler
from ..schedule import NoiseSchedule, rescale_zero_terminal_snr
from .scheduler_table import (ALL_KEYS, BETA_DEFAULTS, BETA_SCHEDULES, SCHEDULE_KEYS, SCHEDULER_CLASSES,  # noqa: F401
                              SELECTORS, SPECS, WHY, SchedulerSpec, class_keys)


def _class_defaults(cfg: dict) -> tuple[float, float]:
    return BETA_DEFAULTS.get(cfg.get("_class_name", ""), (1e-4, 0.02))


def schedule_from_diffusers_config(cfg: dict) -> NoiseSchedule:
    """The NoiseSchedule of a diffusers scheduler config (beta_schedule, trained_betas, zero-SNR rescale)."""
    T = int(cfg.get("num_train_timesteps", 1000))
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten()
        if len(betas) != T:
            raise ConfigError(f"trained_betas has {len(betas)} values but num_train_timesteps={T}; give one beta "
                              f"per training timestep.")
        return NoiseSchedule(rescale_zero_terminal_snr(betas) if rescale else betas)
    kind = cfg.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        hint = difflib.get_close_matches(str(kind), list(BETA_SCHEDULES), n=1)
        raise ConfigError(f"beta_schedule={kind!r} has no diffusekit counterpart; supported: {list(BETA_SCHEDULES)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + ", or give the betas themselves as trained_betas.")
    start, end = _class_defaults(cfg)
    return NoiseSchedule.create(BETA_SCHEDULES[kind], T, float(cfg.get("beta_start", start)),
                                float(cfg.get("beta_end", end)), rescale)


def schedule_to_diffusers_config(schedule: NoiseSchedule, rescale_key: bool = True, sigmoid: bool = True) -> dict:
    """The schedule keys of a diffusers scheduler config; betas that no named schedule gives become trained_betas.

    For scheduler classes without rescale_betas_zero_snr (rescale_key=False: Heun, DEIS, PNDM) or
    without beta_schedule="sigmoid" (sigmoid=False: all but DDPM), such a schedule is written as
    its betas (trained_betas), which every class takes.
    """
    c = schedule.config
    try:
        rebuilt = NoiseSchedule.from_config(c).betas
        named = rebuilt.shape == schedule.betas.shape and bool(torch.allclose(rebuilt, schedule.betas, rtol=0,
                                                                              atol=1e-12))
    except (ConfigError, ValueError):
        named = False
    unnamed = (c.rescale_zero_terminal_snr and not rescale_key) or (c.kind == "sigmoid" and not sigmoid)
    if not named or unnamed:
        cfg = dict(num_train_timesteps=schedule.num_train_timesteps, beta_start=float(schedule.betas[0]),
                   beta_end=float(schedule.betas[-1]), beta_schedule="linear", trained_betas=schedule.betas.tolist(),
                   rescale_betas_zero_snr=False)
    else:
        kind = "squaredcos_cap_v2" if c.kind in ("cosine", "squaredcos_cap_v2") else c.kind
        cfg = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                   beta_schedule=kind, trained_betas=None, rescale_betas_zero_snr=c.rescale_zero_terminal_snr)
    if not rescale_key:
        del cfg["rescale_betas_zero_snr"]
    return cfg


# --- sampler options ----------------------------------------------------------------------------

_VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
# sampler options that diffusers takes as call arguments, not config keys, with the call's default
_CALL_ARGS = {"eta": 0.0, "order": 4}   # order: LMSDiscreteScheduler.step's


def _spec_for(class_name: str | None, cfg: dict) -> SchedulerSpec:
    if not class_name:
        raise ConfigError("the scheduler config names no class (no '_class_name' key); pass class_name, e.g. "
                          "'DDIMScheduler'.")
    specs = [s for s in SPECS if s.class_name == class_name]
    if not specs:
        kind = " is a variance-exploding (sigma) scheduler;" if "Ve" in class_name else " has no counterpart;"
        raise ConfigError(f"diffusers scheduler {class_name!r}{kind} diffusekit drives variance-preserving (beta) "
                          f"schedules with the samplers of {SCHEDULER_CLASSES}. Save the pipeline with one of "
                          "those (scheduler.from_config(...)), or name a diffusekit sampler (sampler=...).")
    if len(specs) > 1:  # the key that picks the sampler (solver_order, skip_prk_steps) and its class default
        key, default = SELECTORS[class_name]
        choices = ", ".join(f"{key}={s.required[key]!r} ({s.sampler})" for s in specs)
        value = cfg.get(key, default)
        specs = [s for s in specs if s.required.get(key) == value and s.sampler in SAMPLERS]
        if not specs:
            raise ConfigError(f"{class_name} with {key}={value!r} has no diffusekit counterpart; use {choices}.")
    spec = specs[0]
    if spec.sampler not in SAMPLERS:
        raise ConfigError(f"{class_name} corresponds to diffusekit's sampler {spec.sampler!r}, which this version "
                          f"does not have; available samplers: {sorted(SAMPLERS)}.")
    return spec


def _unsupported(class_name: str, key: str, have, want) -> ConfigError:
    why = WHY.get(key, f"diffusekit's sampler behaves as {key}={want!r}")
    return ConfigError(f"{class_name} option {key}={have!r} has no diffusekit counterpart ({why}); set "
                       f"{key}={want!r} in the scheduler config to use a diffusekit sampler.")


def check_config_keys(cfg: dict, class_name: str | None = None) -> list[str]:
    """Refuse keys no mapped class has; return the keys of other classes, which diffusers ignores here.

    rescale_betas_zero_snr=True on a class without it is refused (see the module docstring).
    """
    class_name = class_name or cfg.get("_class_name")
    spec = _spec_for(class_name, cfg)
    own = class_keys(spec)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in ALL_KEYS)
    if unknown:
        raise ConfigError(f"{class_name} option {unknown[0]}={cfg[unknown[0]]!r} is not known to diffusekit, so it "
                          f"cannot say whether the sampler honours it; remove it from the scheduler config if it is at "
                          f"diffusers' default (known options of {class_name}: {sorted(own)}).")
    if cfg.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in own:
        raise ConfigError(f"{class_name} option rescale_betas_zero_snr=True is not known to {class_name}: diffusers "
                          "ignores it there and samples the betas without the zero-terminal-SNR rescale; remove it, or "
                          "use a class that has it (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, ...).")
    return sorted(k for k in cfg if not k.startswith("_") and k not in own)


def sampler_from_diffusers_config(cfg: dict, class_name: str | None = None) -> tuple[str, dict]:
    """(sampler name, get_sampler keyword arguments) for a diffusers scheduler config.

    Use as `get_sampler(name, schedule_from_diffusers_config(cfg), **kwargs)`. class_name defaults
    to cfg["_class_name"]. Every key of cfg is converted, checked to have the value that our
    sampler implements, known to have no effect there, or an option of another class that
    diffusers ignores for this one (module docstring); anything else is a ConfigError. Options at
    our sampler's default are left out, except clip_sample for the classes that have it.
    """
    class_name = class_name or cfg.get("_class_name")
    spec = _spec_for(class_name, cfg)
    check_config_keys(cfg, class_name)
    # a class without spacing keys (DPMSolverSinglestep) places its steps one way, whatever a config holds
    spacing = cfg.get("timestep_spacing", spec.spacing) if spec.spacing_keys else spec.spacing
    for key, want in spec.required.items():
        have = cfg.get(key, spec.defaults.get(key, want))
        if have != want:
            raise _unsupported(class_name, key, have, want)
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in spec.predictions:
        raise ConfigError(f"{class_name} option prediction_type={prediction_type!r} has no diffusekit counterpart "
                          f"here (diffusers steps {list(spec.predictions)} as diffusekit's {spec.sampler!r} does); "
                          "load the model with its schedule and pick another sampler.")
    kwargs = dict(prediction_type=prediction_type, timestep_spacing=spacing)
    offset = cfg.get("steps_offset", 0) if spec.spacing_keys else 0
    if spacing == "leading" and offset != 0:      # every class adds it to "leading" timesteps only
        kwargs["steps_offset"] = offset
    kwargs.update(_bounds_from_config(spec, cfg))
    if spec.karras:
        kwargs["use_karras_sigmas"] = bool(cfg.get("use_karras_sigmas", False))
    if "init_noise_sigma" in SAMPLERS[spec.sampler].options and spacing in ("linspace", "trailing"):
        kwargs["init_noise_sigma"] = "sigma_max"      # diffusers' Euler/Heun start from x_T * sigma_max there
    sampler_defaults = SAMPLERS[spec.sampler].options
    for theirs, ours in spec.options.items():
        if theirs in cfg or theirs in spec.defaults:
            value = _option_from_diffusers(class_name, theirs, cfg.get(theirs, spec.defaults.get(theirs)))
            if value != sampler_defaults.get(ours, object()):
                kwargs[ours] = value
    kwargs.update(spec.implied)
    _check_combinations(class_name, {**kwargs, "steps_offset": offset})
    return spec.sampler, kwargs


def _bounds_from_config(spec: SchedulerSpec, cfg: dict) -> dict:
    """clip_sample / thresholding as Sampler options (samplers/clipping.py): the same x0_pred bound, and
    for DDIM the network's eps kept in the update, as DDIMScheduler.step does by default."""
    out = {}
    thresholding = spec.thresholding and bool(cfg.get("thresholding", False))
    if spec.clip:
        out["clip_sample"] = bool(cfg.get("clip_sample", spec.defaults.get("clip_sample", False)))
        if out["clip_sample"] and not thresholding and cfg.get("clip_sample_range", 1.0) != 1.0:
            out["clip_sample_range"] = float(cfg["clip_sample_range"])
    if thresholding:   # diffusers: thresholding, else clipping
        out["thresholding"] = True
        out.update({k: float(cfg[k]) for k in ("dynamic_thresholding_ratio", "sample_max_value") if k in cfg})
    if spec.clip_keeps_eps and (out.get("clip_sample") or thresholding):
        out["use_clipped_model_output"] = False
    return out


def _check_combinations(class_name: str, kwargs: dict) -> None:
    """Option pairs whose diffusers behaviour differs from ours although each option alone matches."""
    spacing = kwargs.get("timestep_spacing", "linspace")   # DPMSolverSinglestep has no spacing key: linspace
    last_t_positive = spacing == "trailing" or (spacing == "leading" and kwargs.get("steps_offset", 0) > 0)
    if class_name == "DDPMScheduler" and kwargs.get("variance_type") == "fixed_large" and last_t_positive:
        raise ConfigError(f"DDPMScheduler with variance_type='fixed_large' and timestep_spacing="
                          f"{spacing!r} (steps_offset={kwargs.get('steps_offset', 0)}) has no "
                          "diffusekit counterpart: its last step (at t > 0) adds noise of variance beta to the final "
                          "sample, while diffusekit's last step adds none; use variance_type='fixed_small', or "
                          "'linspace' spacing (or 'leading' with steps_offset=0).")


def _option_from_diffusers(class_name: str, key: str, value):
    if key == "variance_type":
        if value not in _VARIANCE_TYPES:
            raise ConfigError(f"{class_name} option variance_type={value!r} has no diffusekit counterpart: "
                              f"diffusekit's ddpm takes {list(_VARIANCE_TYPES)}, and learned variances (the UNet's "
                              "extra output channels) are not used by its samplers. Set variance_type='fixed_small' "
                              "(or 'fixed_large'), or sample with a sampler that needs no variance (sampler='ddim').")
        return _VARIANCE_TYPES[value]
    return value


def sampler_to_diffusers_config(sampler: Sampler) -> tuple[str, dict]:
    """(diffusers scheduler class name, config dict) that steps like `sampler` (schedule included).

    The dict pins every option our sampler's behaviour depends on, so that diffusers' defaults
    (which differ between classes and versions) do not leak in.
    """
    specs = [s for s in SPECS if s.sampler == sampler.name]
    if not specs:
        raise ConfigError(f"sampler {sampler.name!r} has no diffusers scheduler counterpart "
                          + (f"({WHY['algorithm_type']})" if "sde" in sampler.name else "")
                          + f"; samplers that map: {sorted(s.sampler for s in SPECS if s.sampler in SAMPLERS)}.")
    spec = specs[0]
    where = f"sampler {sampler.name!r} -> {spec.class_name}"
    if not spec.spacing_keys and (sampler.timestep_spacing, sampler.steps_offset) != (spec.spacing, 0):
        raise ConfigError(f"{where}: timestep_spacing={sampler.timestep_spacing!r} (steps_offset="
                          f"{sampler.steps_offset}) has no counterpart: {spec.class_name} always places its steps "
                          f"as timestep_spacing={spec.spacing!r}; convert a sampler made with that spacing.")
    if sampler.timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ConfigError(f"{where}: timestep_spacing={sampler.timestep_spacing!r} has no diffusers counterpart; "
                          "use 'leading', 'trailing' or 'linspace'.")
    if sampler.prediction_type not in spec.predictions:
        raise ConfigError(f"{where}: diffusers' {spec.class_name} does not step prediction_type="
                          f"{sampler.prediction_type!r} as diffusekit does (it matches for {list(spec.predictions)}); "
                          "pick another sampler.")
    cfg = schedule_to_diffusers_config(sampler.schedule, rescale_key=spec.rescale, sigmoid=spec.sigmoid)
    cfg.update(prediction_type=sampler.prediction_type, **spec.required)
    if spec.spacing_keys:
        cfg.update(timestep_spacing=sampler.timestep_spacing, steps_offset=sampler.steps_offset)
    cfg.update(_bounds_to_config(where, spec, sampler.bounds))
    options = dict(sampler.options)
    karras = bool(options.pop("use_karras_sigmas", False))
    if spec.karras:
        cfg["use_karras_sigmas"] = karras
    elif karras:
        raise ConfigError(f"{where}: use_karras_sigmas=True has no counterpart ({spec.class_name} has no "
                          "use_karras_sigmas); sample without Karras sigmas.")
    for theirs, ours in spec.options.items():
        cfg[theirs] = options.pop(ours)
    # where diffusers starts from x_T * sigma_max, and DEIS landing on x0_pred: documented deliberate differences
    for key in ("init_noise_sigma", *spec.implied):
        options.pop(key, None)
    _check_combinations(spec.class_name, {**cfg, **{ours: cfg[theirs] for theirs, ours in spec.options.items()}})
    for key, value in options.items():
        default = _CALL_ARGS.get(key)
        if value != default:
            raise ConfigError(f"{where}: {key}={value!r} is not part of a diffusers scheduler config"
                              + (f" (diffusers takes {key} as an argument of the pipeline call and of "
                                 f"scheduler.step); convert with {key}={default!r} and pass {key}={value!r} "
                                 "to the call." if key in _CALL_ARGS else "."))
    return spec.class_name, cfg


def _bounds_to_config(where: str, spec: SchedulerSpec, bounds) -> dict:
    """The clip / thresholding keys of the class for a sampler's X0Bounds, or a ConfigError."""
    if bounds.active and spec.clip_keeps_eps and bounds.use_clipped_model_output:
        raise ConfigError(f"{where}: clip_sample=True (or thresholding) with use_clipped_model_output=True has no "
                          "exact counterpart in the scheduler config (diffusers' DDIM keeps the network's eps in its "
                          "update unless the call passes use_clipped_model_output=True); convert a sampler made with "
                          "use_clipped_model_output=False, or pass use_clipped_model_output=True to the diffusers call.")
    if bounds.thresholding and not spec.thresholding:
        raise ConfigError(f"{where}: thresholding=True has no counterpart ({spec.class_name} has no thresholding); "
                          "use ddpm, ddim, dpmpp_2m, dpmpp_3m, unipc or deis, or sample without it.")
    if bounds.clip_sample and not spec.clip and not bounds.thresholding:
        raise ConfigError(f"{where}: clip_sample=True has no counterpart ({spec.class_name} has no clip_sample); "
                          "use ddpm, ddim or heun, or sample without clipping.")
    out = {}
    if spec.clip:
        out.update(clip_sample=bool(bounds.clip_sample), clip_sample_range=float(bounds.clip_sample_range))
    if spec.thresholding:
        out.update(thresholding=bool(bounds.thresholding), dynamic_thresholding_ratio=bounds.dynamic_thresholding_ratio,
                   sample_max_value=bounds.sample_max_value)
    return out
