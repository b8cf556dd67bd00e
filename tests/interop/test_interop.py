"""diffusers interoperability: scheduler configs both ways, diffusers folders in, diffusers folders out.

The numerical checks build tiny randomly initialised models and save them to tmp_path; nothing is downloaded.
"""
import json

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
    ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True, timestep_spacing="trailing")),
    ("PNDMScheduler", {}),   # diffusers' defaults: the Runge-Kutta warm-up (pndm), set_alpha_to_one=False
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    ("KDPM2DiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear")),
    ("DPMSolverSinglestepScheduler", {}),   # diffusers' defaults: order 2 (dpmpp_2s); no spacing keys, linspace
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, solver_type="heun", use_karras_sigmas=True,
                                          thresholding=True)),
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
    assert sampler.timestep_spacing == cfg.get("timestep_spacing", "linspace")   # singlestep: no key, linspace
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
    # smooth and deterministic; eps ~ 0.9 x puts x0_pred far outside [-1, 1] early on, so clipping acts
    return 0.9 * x + 0.3 * torch.sin(3 * x) * torch.cos(t / 300.0).reshape(-1, 1) + 0.1


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
    ("DPMSolverMultistepScheduler", dict(solver_order=3, solver_type="heun", timestep_spacing="trailing")),
    ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True)),
    ("PNDMScheduler", {}),   # Runge-Kutta warm-up; 8 steps: T // n = 125 is odd, diffusers' uneven half steps
    ("DEISMultistepScheduler", {}),   # the last step stops at sigma(t = 0)
    ("DEISMultistepScheduler", dict(use_karras_sigmas=True)),   # sigma_min = sigma(t = 0): a zero-length last step
    ("LMSDiscreteScheduler", {}),   # starts from x_T * sigma_max (linspace), integrates its 4-step polynomial exactly
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    ("KDPM2DiscreteScheduler", {}),   # DPM-2: 8 steps, 15 calls, the midpoints at diffusers' fractional times
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    ("KDPM2DiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    # (with Karras sigmas 2.6e-5: diffusers' float32 alphas_cumprod puts sigma_min 8e-5 off, as for DPM-Solver 2M)
    ("DPMSolverSinglestepScheduler", dict(solver_type="heun", beta_schedule="scaled_linear", beta_start=0.00085,
                                          beta_end=0.012)),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3)),   # 8 steps: stages of 1, 2, 3, 1, 1 calls
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, solver_type="heun", prediction_type="v_prediction")),
])
def test_converted_options_step_like_diffusers(diffusers, class_name, options):
    """Options carried across (clip_sample, variance_type, solver_order, solver_type, ...) mean the same
    thing: the loops agree to 1e-5 (DDPM with the same generator: the start noise, then one draw per step)."""
    scheduler = getattr(diffusers, class_name)(**options)
    if class_name not in SCHEDULER_CLASSES or (options.get("solver_order") == 3 and "dpmpp_3m" not in dk.SAMPLERS):
        pytest.skip(f"{class_name}{options}'s diffusekit sampler is not registered in this version")
    name, kwargs = sampler_from_diffusers_config(_config(scheduler))
    sampler = dk.get_sampler(name, schedule_from_diffusers_config(_config(scheduler)), **kwargs)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(_toy_model, x_T, num_steps=8, generator=torch.Generator().manual_seed(1))
    step_kwargs = {"generator": torch.Generator().manual_seed(1)} if name == "ddpm" else {}
    theirs = _diffusers_loop(scheduler, _toy_model, x_T, 8, **step_kwargs)
    # float32 on both sides: 1e-5 relative; Heun steps x in sigma space, from sigma_max ~ 157, where
    # float32 resolves only ~1e-5 absolute
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4 if name == "heun" else 1e-5)


def test_ddim_clip_sample_keeps_the_network_eps_as_diffusers_does(diffusers):
    """DDIMScheduler(clip_sample=True) clips x0_pred and keeps the network's eps in its update (unless the call
    passes use_clipped_model_output=True): its config converts to use_clipped_model_output=False, which steps as
    diffusers' default; our plain clip_sample=True re-derives eps, diffusers' use_clipped_model_output=True, and
    that one has no config counterpart."""
    sampler = dk.get_sampler("ddim", dk.NoiseSchedule.create("linear"), timestep_spacing="trailing", clip_sample=True)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(_toy_model, x_T, num_steps=8)
    make = lambda: diffusers.DDIMScheduler(clip_sample=True, timestep_spacing="trailing")  # noqa: E731
    torch.testing.assert_close(ours, _diffusers_loop(make(), _toy_model, x_T, 8, use_clipped_model_output=True),
                               rtol=0, atol=1e-5)
    assert (ours - _diffusers_loop(make(), _toy_model, x_T, 8)).abs().max() > 0.1
    name, kwargs = sampler_from_diffusers_config(_config(make()))
    assert kwargs["clip_sample"] and kwargs["use_clipped_model_output"] is False
    converted = dk.get_sampler(name, dk.NoiseSchedule.create("linear"), **kwargs)
    torch.testing.assert_close(converted.sample(_toy_model, x_T, num_steps=8), _diffusers_loop(make(), _toy_model, x_T, 8),
                               rtol=0, atol=1e-5)
    assert sampler_to_diffusers_config(converted)[1]["clip_sample"] is True
    with pytest.raises(ConfigError, match="clip_sample=True.*use_clipped_model_output=True"):
        sampler_to_diffusers_config(sampler)


# the options the issue found "accepted and ignored" are honoured now: what each converts to (the numbers are
# checked against diffusers in tests/interop/test_diffusers_fidelity.py)
HONOURED = [
    ("DDIMScheduler", dict(thresholding=True), dict(thresholding=True, use_clipped_model_output=False)),
    ("DDIMScheduler", dict(set_alpha_to_one=False), dict(set_alpha_to_one=False)),
    ("DDIMScheduler", dict(steps_offset=1), dict(steps_offset=1)),
    ("DDPMScheduler", dict(clip_sample=True, clip_sample_range=2.0), dict(clip_sample=True, clip_sample_range=2.0)),
]


@pytest.mark.parametrize("class_name,cfg,expected", HONOURED)
def test_options_once_refused_now_convert(class_name, cfg, expected):
    name, kwargs = sampler_from_diffusers_config(dict(cfg, _class_name=class_name))
    assert {k: kwargs[k] for k in expected} == expected


UNSUPPORTED = [
    ("DDPMScheduler", dict(variance_type="learned_range"), "variance_type='learned_range'"),
    ("DDPMScheduler", dict(variance_type="learned"), "variance_type='learned'"),
    ("DDPMScheduler", dict(variance_type="fixed_large_log"), "variance_type='fixed_large_log'"),
    ("DDPMScheduler", dict(variance_type="fixed_large", steps_offset=1), "adds noise"),
    ("FooBarScheduler", {}, "'FooBarScheduler' has no counterpart"),
    ("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing"), "adds noise"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), "use_lu_lambdas=True.*logsnr"),
    ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), "interpolation_type='log_linear'"),
    ("UniPCMultistepScheduler", dict(disable_corrector=[0]), "disable_corrector=\\[0\\]"),
    ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True, prediction_type="v_prediction"),
     "prediction_type='v_prediction'"),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="sample"), "prediction_type='sample'"),
    ("DDIMScheduler", dict(clip_sample=False, some_future_option=3), "some_future_option=3 is not known"),
    ("HeunDiscreteScheduler", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True is not known"),
    ("ScoreSdeVeScheduler", {}, "variance-exploding"),
    ("KDPM2AncestralDiscreteScheduler", {}, "'KDPM2AncestralDiscreteScheduler' has no counterpart"),
    ("KDPM2DiscreteScheduler", dict(prediction_type="sample"), "prediction_type='sample'"),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    ("DPMSolverSinglestepScheduler", dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    ("DPMSolverSinglestepScheduler", dict(solver_order=1), "solver_order=1 has no diffusekit counterpart"),
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


# --- diffusers folders in ----------------------------------------------------------------------

def _tiny_unet2d(diffusers, **kwargs):
    with torch.random.fork_rng():   # diffusers initialises from the global generator
        torch.manual_seed(0)
        return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     attention_head_dim=8, **kwargs)


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """Our [-1, 1] samples as diffusers' output_type="np" images, (N, H, W, C) in [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def _run(pipeline_cls, folder, seed, steps):
    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="np").images
    return torch.from_numpy(images)


# A random network predicts eps badly: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) then leaves [-1, 1] unless
# abar stays away from 0, so epsilon cases use a short schedule (abar_T ~ 0.6) to keep the images unclamped.
GENTLE_BETA_END = {"epsilon": 1e-3, "v_prediction": 0.02}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_imported_ddim_matches_diffusers_ddim_pipeline(diffusers, tmp_path, prediction_type):
    """Pipeline.from_diffusers + our DDIM == DDIMPipeline from the same starting noise, to 1e-5."""
    scheduler = diffusers.DDIMScheduler(clip_sample=False, prediction_type=prediction_type,
                                        beta_end=GENTLE_BETA_END[prediction_type])
    diffusers.DDIMPipeline(_tiny_unet2d(diffusers), scheduler).save_pretrained(tmp_path)
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    assert pipe.image_shape == (3, 8, 8) and pipe.prediction_type == prediction_type and pipe.num_classes == 0
    name, options = pipe.config.sampler()
    assert (name, options) == ("ddim", {"timestep_spacing": "leading", "clip_sample": False})
    theirs = _run(diffusers.DDIMPipeline, tmp_path, seed=5, steps=10)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))   # what DDIMPipeline draws
    ours = _as_images(pipe.sample(4, sampler=name, num_steps=10, noise=noise, **options))
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.4   # not a comparison of clamped values
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_every_sampler_and_editor_runs_on_an_imported_pipeline(diffusers, tmp_path):
    """Once loaded, a diffusers UNet is just a model: every registered sampler, SDEdit, inversion and inpainting."""
    diffusers.DDPMPipeline(_tiny_unet2d(diffusers), diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for name in sorted(dk.SAMPLERS):
        x = pipe.sample(2, sampler=name, num_steps=3, generator=g())
        assert x.shape == (2, 3, 8, 8) and bool(x.isfinite().all()), name
    image = pipe.sample(1, sampler="ddim", num_steps=3, generator=g())
    assert pipe.edit(image, strength=0.5, sampler="euler", num_steps=4, generator=g()).shape == image.shape
    x_T = pipe.invert(image, num_steps=4)
    assert pipe.reconstruct(x_T, num_steps=4).shape == image.shape
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    filled = pipe.inpaint(image, mask, num_steps=4, generator=g())
    torch.testing.assert_close(filled * (1 - mask), image * (1 - mask))


def test_class_conditional_diffusers_unet(diffusers, tmp_path):
    unet = _tiny_unet2d(diffusers, num_class_embeds=3)
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    assert pipe.num_classes == 3
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 620.5]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, class_labels=labels), unet(x, t, class_labels=labels).sample)
    assert pipe.sample(2, sampler="ddim", num_steps=3, class_labels=[0, 2]).shape == (2, 3, 8, 8)
    for no_null in (dict(class_labels=1, guidance_scale=3.0), {}):   # CFG and unconditional need a null class
        with pytest.raises(ConfigError, match="no null class.*null_class_label"):
            pipe.sample(2, sampler="ddim", num_steps=3, **no_null)
    with_null = dk.interop.load_diffusers_pipeline(tmp_path, device="cpu", null_class_label=2)
    assert with_null.sample(2, sampler="ddim", num_steps=3, class_labels=0, guidance_scale=2.0).isfinite().all()


def _fake_folder(path, index: dict, scheduler: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "X", **index}))
    for name in index:
        (path / name).mkdir(exist_ok=True)
    if "unet" in index:
        (path / "unet" / "config.json").write_text("{}")
        (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    if scheduler is not None:
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return path


def test_folders_diffusekit_cannot_drive_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder: it has no model_index.json"):
        dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    t2i = _fake_folder(tmp_path / "t2i", {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                                          "text_encoder": ["transformers", "CLIPTextModel"],
                                          "scheduler": ["diffusers", "PNDMScheduler"]})
    with pytest.raises(ConfigError, match="is a text-to-image pipeline without \\['tokenizer'\\]"):
        dk.Pipeline.from_diffusers(t2i, device="cpu", precision="fp32")
    latent = _fake_folder(tmp_path / "ldm", {"unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"],
                                             "scheduler": ["diffusers", "DDIMScheduler"]})
    with pytest.raises(ConfigError, match="a latent pipeline \\(vqvae/\\)"):
        dk.Pipeline.from_diffusers(latent, device="cpu", precision="fp32")
    ddpm = {"unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    with pytest.raises(ConfigError, match="scheduler/scheduler_config.json is missing"):
        dk.Pipeline.from_diffusers(_fake_folder(tmp_path / "incomplete", ddpm), device="cpu", precision="fp32")
    ve = _fake_folder(tmp_path / "ve", ddpm, {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 50})
    with pytest.raises(ConfigError, match="ScoreSdeVeScheduler has no beta schedule"):
        dk.Pipeline.from_diffusers(ve, device="cpu", precision="fp32")


# --- diffusers folders out ---------------------------------------------------------------------

def _our_unet(**overrides) -> UNet:
    cfg = UNetConfig(**{**dict(image_size=8, in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(4,), num_heads=2, groups=4), **overrides})
    model = UNet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # a fresh UNet outputs exactly 0 (zero-initialised branches): randomise everything
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("overrides", [
    {},
    dict(channel_mult=(1, 2, 2), attention_resolutions=(8, 2), head_dim=8, use_scale_shift_norm=False, num_res_blocks=2),
    dict(channel_mult=(1, 1, 2), attention_resolutions=(), num_heads=1, out_channels=6),
])
def test_unet2d_weights_give_the_same_outputs(diffusers, overrides):
    model = _our_unet(**overrides)
    assert unet2d_incompatibility(model.config) is None
    unet = diffusers.UNet2DModel(**unet2d_config(model.config))
    unet.load_state_dict(unet2d_state_dict(model), strict=True)
    x, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.0, 37.0, 512.5, 999.0])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model(x, t), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (dict(num_classes=2), "class-conditional"),
    (dict(channel_mult=(2, 2)), "channel_mult starts with 2"),
    (dict(attention_resolutions=(8, 4)), "different head sizes"),
    (dict(text_conditioning="cross_attention", context_dim=8), "text-conditioned"),
])
def test_layouts_without_unet2d_counterpart_say_why(overrides, message):
    assert message in unet2d_incompatibility(_our_unet(**overrides).config)


@pytest.mark.parametrize("sampler,prediction_type,overrides", [
    ("ddpm", "epsilon", {}),
    ("ddim", "v_prediction", dict(use_scale_shift_norm=False, head_dim=8)),
])
def test_export_loads_in_diffusers_and_samples_the_same(diffusers, tmp_path, sampler, prediction_type, overrides):
    """The exported folder: UNet2DModel outputs = ours, DDPMPipeline / DDIMPipeline samples = ours (same
    generator: start noise, then DDPM's step noise), and Pipeline.from_diffusers reads it back."""
    model = _our_unet(**overrides)
    schedule = dk.NoiseSchedule.create("linear", beta_end=GENTLE_BETA_END[prediction_type])
    pipe = dk.Pipeline(model, schedule, image_shape=(3, 8, 8), prediction_type=prediction_type, device="cpu",
                       precision="fp32")
    result = export_diffusers(pipe, tmp_path, sampler=sampler)
    assert result.diffusers_loadable and result.reason is None and dk.interop.is_diffusers_folder(tmp_path)
    assert {"model_index.json", "README.md", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"} == set(result.files)
    pipeline_cls = getattr(diffusers, result.pipeline_class)
    theirs = _run(pipeline_cls, tmp_path, seed=3, steps=10)
    ours = pipe.sample(4, sampler=sampler, num_steps=10, generator=torch.Generator().manual_seed(3),
                       timestep_spacing="leading")
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.4
    torch.testing.assert_close(_as_images(ours), theirs, rtol=0, atol=1e-5)
    again = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    assert again.prediction_type == prediction_type and again.config.sampler()[0] == sampler
    torch.testing.assert_close(again.sample(4, sampler=sampler, num_steps=10, generator=torch.Generator().manual_seed(3),
                                            timestep_spacing="leading"), ours, rtol=0, atol=1e-5)


def test_export_without_unet2d_counterpart_keeps_our_weights(tmp_path):
    """A class-conditional UNet: refused with require_unet2d, else our weights + scheduler + a README
    saying why, and the folder still loads in diffusekit with the same samples."""
    pipe = dk.Pipeline(_our_unet(num_classes=2), dk.NoiseSchedule.create("cosine"), image_shape=(3, 8, 8),
                       num_classes=2, class_names=("a", "b"), device="cpu")
    with pytest.raises(ConfigError, match="cannot be written as a diffusers UNet2DModel: the model is class-conditional"):
        export_diffusers(pipe, tmp_path / "strict", require_unet2d=True)
    result = export_diffusers(pipe, tmp_path / "out")
    assert not result.diffusers_loadable and "class-conditional" in result.reason
    assert dk.interop.is_diffusers_folder(tmp_path / "out") and not dk.interop.is_diffusers_folder(tmp_path)
    assert not (tmp_path / "out" / "model_index.json").exists()
    assert "not loadable" in (tmp_path / "out" / "README.md").read_text()
    again = dk.Pipeline.from_diffusers(tmp_path / "out", device="cpu", precision="fp32")
    assert again.class_names == ["a", "b"]
    # the same sampler settings on both sides (the folder's own scheduler, DDPM with leading spacing, would be its default)
    kwargs = dict(sampler="ddim", num_steps=4, class_labels=[0, 1], guidance_scale=2.0, timestep_spacing="trailing")
    torch.testing.assert_close(again.sample(2, generator=torch.Generator().manual_seed(0), **kwargs),
                               pipe.sample(2, generator=torch.Generator().manual_seed(0), **kwargs), rtol=0, atol=0)


def test_export_refusals(tmp_path):
    pipe = dk.Pipeline(_our_unet(), dk.NoiseSchedule.create("linear"), image_shape=(3, 8, 8), device="cpu")
    with pytest.raises(ConfigError, match="scale_model_input"):
        export_diffusers(pipe, tmp_path / "euler", sampler="euler")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty.*overwrite=True"):
        export_diffusers(pipe, tmp_path / "busy")


def test_noise_schedule_diffusers_config_round_trip():
    # the conversions live in interop.schedulers only (schedule.py imports no interop: no circle)
    from diffusekit.interop.schedulers import schedule_from_diffusers_config, schedule_to_diffusers_config
    cfg = {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True}
    schedule = schedule_from_diffusers_config(cfg)
    assert schedule.config.kind == "cosine" and float(schedule.alphas_cumprod[-1]) == 0.0
    assert {k: schedule_to_diffusers_config(schedule)[k] for k in cfg} == cfg
