"""diffusers interoperability: scheduler configs both ways, diffusers folders in, diffusers folders out.

The numerical checks build tiny randomly initialised models and save them to tmp_path; nothing is downloaded.
"""
import json
import math

import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError
from diffusekit.interop import (SCHEDULER_CLASSES, export_diffusers, sampler_from_diffusers_config,
                                sampler_to_diffusers_config, schedule_from_diffusers_config,
                                schedule_to_diffusers_config, unet2d_config, unet2d_incompatibility, unet2d_state_dict)
from diffusekit.nn.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def diffusers():
    d = pytest.importorskip("diffusers")
    d.utils.logging.set_verbosity_error()   # "accelerate not found" and similar notices
    return d


def _config(scheduler) -> dict:
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


# --- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("rescale", [False, True])
def test_schedule_round_trip(diffusers, beta_schedule, rescale):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03,
                                     beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    cfg = _config(theirs)
    schedule = schedule_from_diffusers_config(cfg)
    # diffusers computes in float32, we in float64
    torch.testing.assert_close(schedule.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=0, atol=1e-6)
    back = schedule_to_diffusers_config(schedule)
    assert back == {k: cfg[k] for k in back}


def test_trained_betas_round_trip(diffusers):
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64) ** 1.5 + 1e-4
    theirs = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=betas.tolist())
    schedule = schedule_from_diffusers_config(_config(theirs))
    torch.testing.assert_close(schedule.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=0, atol=1e-6)
    back = schedule_to_diffusers_config(schedule)
    assert back["trained_betas"] == betas.tolist() and back["num_train_timesteps"] == 100
    # a schedule built from its own betas (no named kind behind it) is written as trained_betas too
    assert schedule_to_diffusers_config(dk.NoiseSchedule(betas))["trained_betas"] == betas.tolist()


def test_schedule_errors_name_the_option():
    with pytest.raises(ConfigError, match="beta_schedule='exp'.*squaredcos_cap_v2"):
        schedule_from_diffusers_config({"beta_schedule": "exp"})
    with pytest.raises(ConfigError, match="trained_betas has 3 values but num_train_timesteps=1000"):
        schedule_from_diffusers_config({"trained_betas": [0.1, 0.2, 0.3]})


# --- sampler options ---------------------------------------------------------------------------

ROUND_TRIPS = [
    ("DDPMScheduler", {}),   # diffusers' defaults: clip_sample=True, leading spacing
    ("DDPMScheduler", dict(variance_type="fixed_large", clip_sample=False, prediction_type="v_prediction",
                           timestep_spacing="linspace")),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", beta_schedule="squaredcos_cap_v2")),
    ("DDIMScheduler", dict(clip_sample=False, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True,
                           timestep_spacing="trailing", prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, prediction_type="sample")),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, solver_type="heun", lower_order_final=False)),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading")),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                             beta_start=0.00085, beta_end=0.012)),
    ("HeunDiscreteScheduler", dict(clip_sample=True, use_karras_sigmas=True)),
    ("UniPCMultistepScheduler", dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2")),
    ("DEISMultistepScheduler", dict(solver_order=3, lower_order_final=False)),
    ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True, prediction_type="v_prediction")),
]


def test_every_mapped_class_has_a_round_trip():
    assert SCHEDULER_CLASSES == sorted({c for c, _ in ROUND_TRIPS if c in SCHEDULER_CLASSES})


@pytest.mark.parametrize("class_name,options", ROUND_TRIPS)
def test_sampler_round_trip(diffusers, class_name, options):
    """diffusers config -> diffusekit sampler -> diffusers config: the same on every key we write, and
    a scheduler diffusers builds from it without unused keys, with our schedule's alphas_cumprod."""
    if class_name not in SCHEDULER_CLASSES:
        pytest.skip(f"{class_name}'s diffusekit sampler is not registered in this version")
    cfg = _config(getattr(diffusers, class_name)(**options))
    name, kwargs = sampler_from_diffusers_config(cfg)
    schedule = schedule_from_diffusers_config(cfg)
    sampler = dk.get_sampler(name, schedule, **kwargs)
    assert sampler.prediction_type == cfg["prediction_type"]
    assert sampler.timestep_spacing == cfg["timestep_spacing"]
    class_back, back = sampler_to_diffusers_config(sampler)
    assert class_back == class_name
    expected = dict(cfg, variance_type="fixed_small") if cfg.get("variance_type") == "fixed_small_log" else cfg
    assert {k: expected[k] for k in back} == back
    rebuilt, unused = getattr(diffusers, class_back).from_config(back, return_unused_kwargs=True)
    assert unused == {}
    torch.testing.assert_close(schedule.alphas_cumprod, rebuilt.alphas_cumprod.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,kind,rescale", [("unipc", "sigmoid", False), ("heun", "linear", True)])
def test_schedules_a_class_cannot_name_travel_as_betas(diffusers, name, kind, rescale):
    """Only DDPMScheduler knows "sigmoid", and Heun has no rescale_betas_zero_snr: such schedules are
    written as trained_betas, which give diffusers the same alphas_cumprod."""
    schedule = dk.NoiseSchedule.create(kind, rescale_zero_terminal_snr=rescale)
    class_name, cfg = sampler_to_diffusers_config(dk.get_sampler(name, schedule))
    assert cfg["trained_betas"] is not None
    rebuilt = getattr(diffusers, class_name).from_config(cfg)
    torch.testing.assert_close(schedule.alphas_cumprod, rebuilt.alphas_cumprod.double(), rtol=0, atol=1e-6)


def _toy_model(x, t):
    # a smooth, deliberately large output, so that clipping x0_pred to [-1, 1] acts
    return 2.0 * torch.tanh(x) * torch.cos(t / 300.0).reshape(-1, 1) + 0.3


def _diffusers_loop(scheduler, model, x_T, num_steps, **step_kwargs):
    scheduler.set_timesteps(num_steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.reshape(1).expand(len(x)).float())
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("class_name,options", [
    ("DDPMScheduler", dict(clip_sample=True, timestep_spacing="trailing")),
    ("DDPMScheduler", dict(clip_sample=True, variance_type="fixed_large")),
    ("HeunDiscreteScheduler", dict(clip_sample=True, beta_start=1e-4, beta_end=0.02)),
])
def test_converted_options_step_like_diffusers(diffusers, class_name, options):
    """Options carried across (clip_sample, variance_type) mean the same thing: the loops agree to 1e-5
    (DDPM with the same generator: both draw the start noise, then one draw per step)."""
    scheduler = getattr(diffusers, class_name)(**options)
    name, kwargs = sampler_from_diffusers_config(_config(scheduler))
    sampler = dk.get_sampler(name, schedule_from_diffusers_config(_config(scheduler)), **kwargs)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(_toy_model, x_T, num_steps=8, generator=torch.Generator().manual_seed(1))
    step_kwargs = {"generator": torch.Generator().manual_seed(1)} if name == "ddpm" else {}
    theirs = _diffusers_loop(scheduler, _toy_model, x_T, 8, **step_kwargs)
    # Heun steps x in sigma space, at sigma_max ~ 157 to start, where float32 resolves only ~1e-5
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 if name == "heun" else 1e-5)


def test_ddim_clip_sample_is_refused_because_diffusers_keeps_eps(diffusers):
    """Why DDIMScheduler(clip_sample=True) does not convert: our clipped DDIM is diffusers' only with
    use_clipped_model_output=True, a call argument, and far from it without."""
    sampler = dk.get_sampler("ddim", dk.NoiseSchedule.create("linear"), timestep_spacing="trailing", clip_sample=True)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(_toy_model, x_T, num_steps=8)
    make = lambda: diffusers.DDIMScheduler(clip_sample=True, timestep_spacing="trailing")  # noqa: E731
    torch.testing.assert_close(ours, _diffusers_loop(make(), _toy_model, x_T, 8, use_clipped_model_output=True),
                               rtol=0, atol=1e-5)
    assert (ours - _diffusers_loop(make(), _toy_model, x_T, 8)).abs().max() > 0.1
    with pytest.raises(ConfigError, match="clip_sample=True.*use_clipped_model_output=True"):
        sampler_from_diffusers_config(_config(make()))
    with pytest.raises(ConfigError, match="clip_sample=True.*use_clipped_model_output=True"):
        sampler_to_diffusers_config(sampler)


UNSUPPORTED = [
    ("DDIMScheduler", dict(thresholding=True), "thresholding=True"),
    ("DDIMScheduler", dict(set_alpha_to_one=False), "set_alpha_to_one=False"),
    ("DDIMScheduler", dict(steps_offset=1), "steps_offset=1"),
    ("DDPMScheduler", dict(clip_sample=True, clip_sample_range=2.0), "clip_sample_range=2.0"),
    ("DDPMScheduler", dict(variance_type="learned_range"), "variance_type='learned_range'"),
    ("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing"), "adds noise"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), "use_lu_lambdas=True.*logsnr"),
    ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), "interpolation_type='log_linear'"),
    ("UniPCMultistepScheduler", dict(disable_corrector=[0]), "disable_corrector=\\[0\\]"),
    ("PNDMScheduler", {}, "skip_prk_steps=False"),
    ("DDIMScheduler", dict(clip_sample=False, some_future_option=3), "some_future_option=3 is not known"),
    ("HeunDiscreteScheduler", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True is not known"),
    ("ScoreSdeVeScheduler", {}, "variance-exploding"),
    ("LMSDiscreteScheduler", {}, "'LMSDiscreteScheduler' has no counterpart"),
]


@pytest.mark.parametrize("class_name,cfg,message", UNSUPPORTED)
def test_unsupported_diffusers_options_are_errors(class_name, cfg, message):
    with pytest.raises(ConfigError, match=message):
        sampler_from_diffusers_config(dict(cfg, _class_name=class_name))


@pytest.mark.parametrize("name,kwargs,message", [
    ("ddim", dict(eta=0.5), "eta=0.5 is not part of a diffusers scheduler config.*DDIMPipeline|eta=0.5.*call"),
    ("ddim", dict(timestep_spacing="logsnr"), "timestep_spacing='logsnr'"),
    ("euler_ancestral", dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
    ("euler", dict(clip_sample=True), "clip_sample=True"),
    ("euler_ancestral", dict(prediction_type="sample"), "prediction_type='sample'"),
])
def test_sampler_options_without_diffusers_counterpart_are_errors(name, kwargs, message):
    sampler = dk.get_sampler(name, dk.NoiseSchedule.create("linear"), **kwargs)
    with pytest.raises(ConfigError, match=message):
        sampler_to_diffusers_config(sampler)
