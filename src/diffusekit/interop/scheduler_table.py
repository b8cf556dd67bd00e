"""The table of diffusers scheduler classes and the diffusekit samplers that step as they do.

One SchedulerSpec per (class, sampler) pair; interop/schedulers.py converts configs with it, both ways.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..samplers import SAMPLERS
from ..schedule import PREDICTION_TYPES

# diffusers' beta_schedule names -> NoiseSchedule kinds
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")
# the class defaults of beta_start / beta_end where they are not DDPM's (a hand-written config may omit them)
BETA_DEFAULTS = {"HeunDiscreteScheduler": (0.00085, 0.012), "KDPM2DiscreteScheduler": (0.00085, 0.012)}
# keys that only act together with an option we require off (flow or shifted sigmas)
_NO_EFFECT = ("flow_shift", "time_shift_type")
_THRESHOLD_KEYS = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
_OFF_SIGMAS = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
_OFF_SOLVER = dict(use_flow_sigmas=False, use_dynamic_shifting=False, **_OFF_SIGMAS)


@dataclass(frozen=True)
class SchedulerSpec:
    """How one diffusers scheduler class corresponds to one diffusekit sampler.

    required: diffusers options whose value must be this one (it is the behaviour of our sampler);
    options: diffusers option -> our sampler option, passed through; defaults: diffusers' class
    defaults where they differ from `required` (used for keys a config leaves out).
    """
    class_name: str
    sampler: str
    spacing: str                                   # diffusers' default timestep_spacing for the class
    required: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    clip: bool = False                             # the class has clip_sample and clip_sample_range
    clip_keeps_eps: bool = False                   # bounding x0_pred leaves the eps in the update unclipped
    thresholding: bool = False                     # the class has dynamic thresholding (Imagen)
    karras: bool = False                           # the class has use_karras_sigmas
    predictions: tuple = PREDICTION_TYPES          # prediction types diffusers steps with as we do
    no_effect: tuple = ()                          # keys without effect under `required`
    rescale: bool = True                           # the class has rescale_betas_zero_snr
    sigmoid: bool = False                          # the class has beta_schedule="sigmoid"
    implied: dict = field(default_factory=dict)    # our sampler options the class always steps with (no key)
    spacing_keys: bool = True                      # the class has timestep_spacing and steps_offset (else: `spacing`)


def _singlestep(sampler: str, solver_order: int) -> SchedulerSpec:
    return SchedulerSpec("DPMSolverSinglestepScheduler", sampler, "linspace",
                         dict(solver_order=solver_order, algorithm_type="dpmsolver++", final_sigmas_type="zero",
                              lambda_min_clipped=-math.inf, variance_type=None, **_OFF_SOLVER),
                         options={"solver_type": "solver_type"}, karras=True, thresholding=True, rescale=False,
                         no_effect=("lower_order_final",), spacing_keys=False)


SPECS = [
    SchedulerSpec("DDPMScheduler", "ddpm", "leading", options={"variance_type": "variance_type"},
                  defaults=dict(clip_sample=True), clip=True, thresholding=True, sigmoid=True),
    SchedulerSpec("DDIMScheduler", "ddim", "leading", options={"set_alpha_to_one": "set_alpha_to_one"},
                  defaults=dict(clip_sample=True), clip=True, clip_keeps_eps=True, thresholding=True),
    SchedulerSpec("DPMSolverMultistepScheduler", "dpmpp_2m", "linspace",
                  dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero",
                       use_lu_lambdas=False, lambda_min_clipped=-math.inf, variance_type=None, **_OFF_SOLVER),
                  karras=True, thresholding=True, no_effect=("lower_order_final", "euler_at_final")),  # final sigma 0
    SchedulerSpec("DPMSolverMultistepScheduler", "dpmpp_3m", "linspace",
                  dict(solver_order=3, algorithm_type="dpmsolver++", final_sigmas_type="zero", use_lu_lambdas=False,
                       lambda_min_clipped=-math.inf, variance_type=None, **_OFF_SOLVER),
                  options={"solver_type": "solver_type", "lower_order_final": "lower_order_final"},
                  karras=True, thresholding=True, no_effect=("euler_at_final",)),
    SchedulerSpec("EulerDiscreteScheduler", "euler", "linspace",
                  dict(interpolation_type="linear", sigma_min=None, sigma_max=None, timestep_type="discrete",
                       final_sigmas_type="zero", **_OFF_SIGMAS), karras=True),
    SchedulerSpec("EulerAncestralDiscreteScheduler", "euler_ancestral", "linspace",
                  predictions=("epsilon", "v_prediction")),
    SchedulerSpec("HeunDiscreteScheduler", "heun", "linspace", dict(**_OFF_SIGMAS), clip=True, karras=True,
                  rescale=False),
    SchedulerSpec("UniPCMultistepScheduler", "unipc", "linspace",
                  dict(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
                       solver_p=None, final_sigmas_type="zero", sigma_min=None, sigma_max=None, shift_terminal=None,
                       **_OFF_SOLVER), karras=True, thresholding=True),
    SchedulerSpec("DEISMultistepScheduler", "deis", "linspace",
                  dict(algorithm_type="deis", solver_type="logrho", **_OFF_SOLVER),
                  options={"solver_order": "solver_order", "lower_order_final": "lower_order_final"}, karras=True,
                  thresholding=True, rescale=False, implied=dict(set_alpha_to_one=False)),   # stops at sigma(t = 0)
    SchedulerSpec("PNDMScheduler", "plms", "leading", dict(skip_prk_steps=True),
                  options={"set_alpha_to_one": "set_alpha_to_one"},
                  # PNDM runs its multistep formula on raw v outputs from different timesteps, ours on eps
                  defaults=dict(set_alpha_to_one=False), predictions=("epsilon",),
                  rescale=False),
    SchedulerSpec("LMSDiscreteScheduler", "lms", "linspace", dict(**_OFF_SIGMAS), karras=True, rescale=False),
    SchedulerSpec("PNDMScheduler", "pndm", "leading", dict(skip_prk_steps=False), predictions=("epsilon",),
                  options={"set_alpha_to_one": "set_alpha_to_one"}, defaults=dict(set_alpha_to_one=False),
                  rescale=False),
    # DPM-2; Karras sigmas at rounded timesteps, as the class places them (the sampler's karras_rounded)
    SchedulerSpec("KDPM2DiscreteScheduler", "kdpm2", "linspace", dict(**_OFF_SIGMAS), karras=True, rescale=False,
                  predictions=("epsilon", "v_prediction")),   # diffusers' KDPM2 cannot step "sample"
    # singlestep DPM-Solver++: always linspace (no spacing keys); lower_order_final is forced on by the final sigma 0
    _singlestep("dpmpp_2s", 2),
    _singlestep("dpmpp_3s", 3),
]
SELECTORS = {"DPMSolverMultistepScheduler": ("solver_order", 2), "PNDMScheduler": ("skip_prk_steps", False),
             "DPMSolverSinglestepScheduler": ("solver_order", 2)}
# the ones whose sampler is registered (plms, deis and dpmpp_3m arrived later than the others)
SCHEDULER_CLASSES = sorted({s.class_name for s in SPECS if s.sampler in SAMPLERS})

WHY = {
    "final_sigmas_type": "diffusekit's last step goes to sigma = 0",
    "variance_type": "the model's learned variances are not used by diffusekit's samplers",
    "use_lu_lambdas": "diffusekit's nearest option is timestep_spacing='logsnr' (uniform in log-SNR, not "
                      "rounded to integer timesteps), which is not the same placement",
    "algorithm_type": "diffusekit's DPM-Solver samplers are the data-prediction ODE solvers ('dpmsolver++'); "
                      "its dpmpp_3m_sde follows k-diffusion, whose third-order SDE update is not diffusers' "
                      "'sde-dpmsolver++'",
}


def class_keys(spec: SchedulerSpec) -> set:
    """The config keys of spec's diffusers class that diffusekit reads, checks or knows to be inert."""
    keys = set(SCHEDULE_KEYS) - (set() if spec.rescale else {"rescale_betas_zero_snr"})
    keys |= set(spec.required) | set(spec.options) | set(_NO_EFFECT) | set(spec.no_effect)
    keys |= {"prediction_type"} | ({"timestep_spacing", "steps_offset"} if spec.spacing_keys else set())
    keys |= {"clip_sample", "clip_sample_range"} if spec.clip else set()
    keys |= set(_THRESHOLD_KEYS) if spec.thresholding else set()
    return keys | ({"use_karras_sigmas"} if spec.karras else set())


# every key of every mapped class: a key outside this set is unknown, one inside it but not in a
# class's own keys belongs to another class, which diffusers ignores (its from_config keeps such keys)
ALL_KEYS = frozenset().union(*(class_keys(s) for s in SPECS))

