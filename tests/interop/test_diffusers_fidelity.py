"""A diffusers folder samples as diffusers samples it: every mapped scheduler class, at diffusers' DEFAULT
config and at Stable Diffusion 1.x's scheduler config, same noise, same images.

The model is diffusers' default UNet2DModel shrunk in size only (block_out_channels, layers_per_block,
sample_size), randomly initialised and saved to tmp_path; nothing is downloaded. "Theirs" is the
diffusers pipeline: DDIMPipeline / DDPMPipeline for their classes, and for the other classes the loop
every diffusers pipeline runs (latents * init_noise_sigma, scale_model_input, unet, step), since
DDPMPipeline calls neither of the first two. Stochastic samplers (DDPM, Euler ancestral) get the same
generator on both sides: the start noise, then one draw per step, in the same order.

Tolerances: a random eps network gives x0_pred = (x - sqrt(1 - abar) eps) / sqrt(abar) far outside
[-1, 1], so most final pixels are clamped; the comparison is therefore made on the raw final sample
(before the [0, 1] clamp) relative to its size, |ours - theirs| <= TOL * (1 + |theirs|), besides the
clamped images (batches of 2 or more: the shrunk default UNet has 32 channels in 32 groups at 1x1).
TOL = 2e-4 is float32 level here: samples reach |x| ~ 700, where one float32 step (ulp) is 6e-5, and
10 steps through a UNet add a few. One case needs more, and says why next to its number.
"""
import json
import warnings

import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError

TOL = 2e-4
# diffusers' linear default reaches abar_T ~ 4e-5: x0_pred = x / sqrt(abar) multiplies float32 rounding by ~158.
# Measured: our DDIM in float64 equals diffusers' DDIM loop in float64 exactly (0.0); each side in float32 is
# ~5e-4 from that answer, so the two float32 runs differ by up to that much (3.6e-4 on the [0, 1] images).
CLIPPED_DEFAULT_TOL = 1.5e-3
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                    set_alpha_to_one=False, skip_prk_steps=True)
CLASSES = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
           "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
           "DPMSolverSinglestepScheduler"]


@pytest.fixture(scope="module")
def diffusers():
    d = pytest.importorskip("diffusers", reason="the fidelity checks compare with diffusers itself")
    d.utils.logging.set_verbosity_error()
    return d


@pytest.fixture(scope="module")
def unet(diffusers):
    with torch.random.fork_rng():   # diffusers initialises from the global generator
        torch.manual_seed(0)
        return diffusers.UNet2DModel(sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=1).eval()


def _scheduler(diffusers, class_name: str, config: str):
    """diffusers' default config, or SD 1.x's PNDM config moved to the class as diffusers users do
    (Class.from_config keeps the keys the class lacks, e.g. skip_prk_steps; SD's json also holds clip_sample)."""
    cls = getattr(diffusers, class_name)
    if config == "default":
        return cls()
    sd = {**diffusers.PNDMScheduler(**SD_SCHEDULER).config, "clip_sample": False}
    return cls.from_config(sd)


def _diffusers_loop(unet, scheduler, noise, steps, generator):
    """What every diffusers pipeline does with a scheduler; returns the raw final sample."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    stochastic = "generator" in scheduler.step.__code__.co_varnames
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, **({"generator": generator} if stochastic else {})).prev_sample
    return x


def _ours(pipe, steps, noise, seed, **kwargs):
    """pipe.sample with the folder's defaults; (images in [0, 1], raw final sample before the clamp)."""
    finals = []
    name = kwargs.get("sampler") or pipe.default_sampler_options()[0]
    stochastic = dk.SAMPLERS[name].stochastic
    images = pipe.sample(len(noise), num_steps=steps, generator=torch.Generator().manual_seed(seed),
                         noise=None if stochastic else noise, callback=lambda info: finals.append(info.x), **kwargs)
    return images / 2 + 0.5, finals[-1]


def _close(ours, theirs, tol):
    worst = float(((ours - theirs).abs() / (1 + theirs.abs())).max())
    assert worst <= tol, f"max relative difference {worst:.2e} > {tol:.0e}"
    return worst


@pytest.mark.parametrize("config", ["default", "sd"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_folder_samples_as_diffusers_does(diffusers, unet, tmp_path, class_name, config):
    scheduler = _scheduler(diffusers, class_name, config)
    diffusers.DDPMPipeline(unet, scheduler).save_pretrained(tmp_path)
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    if class_name == "PNDMScheduler" and config == "default":
        # PNDMScheduler() warms up with Runge-Kutta steps (skip_prk_steps=False): diffusekit's pndm, 10 steps = 19 calls
        assert pipe.default_sampler_options()[:2] == ("pndm", {"timestep_spacing": "leading",
                                                               "set_alpha_to_one": False})
        assert pipe.resolve_sampler().nfe(10) == 19
    seed, steps = 0, 10
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(4, 3, 8, 8, generator=generator)        # what the diffusers pipelines draw first
    loaded = getattr(diffusers, class_name).from_pretrained(tmp_path, subfolder="scheduler")
    theirs = _diffusers_loop(unet, loaded, noise, steps, generator)
    images, final = _ours(pipe, steps, noise, seed)
    tol = TOL   # DEIS too: its folders stop at sigma(t = 0) as diffusers does (was 5e-2 while ours landed on x0_pred)
    if config == "default" and class_name == "DDIMScheduler":
        tol = CLIPPED_DEFAULT_TOL
    _close(final, theirs, tol)
    assert float((images - (theirs / 2 + 0.5).clamp(0, 1)).abs().max()) <= tol * 2
    if class_name in ("DDIMScheduler", "DDPMScheduler"):    # and the pipeline class itself, images as users get them
        pipeline = getattr(diffusers, class_name.replace("Scheduler", "Pipeline")).from_pretrained(tmp_path)
        pipeline.set_progress_bar_config(disable=True)
        out = pipeline(batch_size=4, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                       output_type="pt").images
        assert float((images - out).abs().max()) <= tol * 2


def test_the_issue_case_ddim_defaults(diffusers, unet, tmp_path):
    """DDIMPipeline(unet, DDIMScheduler(num_train_timesteps=1000)): clip_sample=True, leading spacing,
    set_alpha_to_one=True. Before: max difference 1.0 and 94 % of pixels off by more than 1e-3."""
    diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path)
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0,
                      output_type="pt").images
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    ours = pipe.sample(4, sampler="ddim", num_steps=10, noise=noise) / 2 + 0.5
    assert ((theirs > 0.01) & (theirs < 0.99)).float().mean() > 0.9      # not a comparison of clamped pixels
    assert float((ours - theirs).abs().max()) <= CLIPPED_DEFAULT_TOL
    # the check can fail: without the folder's clipping and spacing (the old behaviour) it is far off
    old = pipe.sample(4, sampler="ddim", num_steps=10, noise=noise, timestep_spacing="trailing", clip_sample=False)
    assert float((old / 2 + 0.5 - theirs).abs().max()) > 0.1


def test_options_diffusers_has_are_honoured(diffusers, unet, tmp_path):
    """thresholding, clip_sample_range=0.1 and set_alpha_to_one=False (the issue's "ignored" options) act as in
    diffusers: same raw samples; and each changes the result, so the check can fail."""
    results = {}
    for name, options in [("range", dict(clip_sample_range=0.1)), ("threshold", dict(thresholding=True,
                          sample_max_value=2.0, dynamic_thresholding_ratio=0.9)),
                          ("alpha", dict(set_alpha_to_one=False, clip_sample=False))]:
        folder = tmp_path / name
        diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler(**options)).save_pretrained(folder)
        theirs = _diffusers_loop(unet, diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
                                 torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 6, None)
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        _, final = _ours(dk.Pipeline.from_diffusers(folder, device="cpu", precision="fp32"), 6, noise, 1)
        _close(final, theirs, CLIPPED_DEFAULT_TOL)
        results[name] = final
    assert float(results["range"].abs().max()) <= 0.1 + 1e-6        # x0 clipped to [-0.1, 0.1] at the last step
    assert float((results["range"] - results["threshold"]).abs().max()) > 0.05


def _edit_scheduler(folder, **changes):
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes,message", [
    (dict(_class_name="FooBarScheduler"), "'FooBarScheduler', which is not a diffusers scheduler.*_class_name"),
    (dict(some_future_option=3), "some_future_option=3 is not known.*remove it"),
])
def test_scheduler_configs_diffusekit_cannot_read_are_refused_at_load(diffusers, unet, tmp_path, changes, message):
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    _edit_scheduler(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")


def test_learned_variances_are_refused_and_other_samplers_say_what_does_not_carry_over(diffusers, unet, tmp_path):
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler(variance_type="learned_range")).save_pretrained(tmp_path)
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    with pytest.raises(ConfigError, match="variance_type='learned_range'.*sampler='ddim'"):
        pipe.sample(2, num_steps=2)
    with pytest.raises(ConfigError, match="variance_type='learned_range'"):
        pipe.sample(2, sampler="ddpm", num_steps=2)
    # DDIM has no variance: learned_range does not carry over (one line), clip_sample and the spacing do
    name, options, note = pipe.default_sampler_options("ddim")
    assert options == {"timestep_spacing": "leading", "clip_sample": True, "use_clipped_model_output": False}
    assert note.count("\n") == 0 and "variance_type='learned_range'" in note and "DDIMScheduler" in note
    with pytest.warns(UserWarning, match="variance_type='learned_range' do not carry over to sampler 'ddim'"):
        pipe.sample(2, sampler="ddim", num_steps=2)
    resolved = pipe.resolve_sampler("ddim", timestep_spacing="trailing", eta=0.5)    # the caller's options win
    assert (resolved.timestep_spacing, resolved.options["eta"], resolved.clip_sample) == ("trailing", 0.5, True)
    name, options, note = pipe.default_sampler_options("euler")
    assert options["timestep_spacing"] == "leading" and "clip_sample" not in options
    assert "clip_sample=True" in note and "variance_type='learned_range'" in note
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # a run (no folder) has nothing to carry over, and says nothing
        run = dk.Pipeline(pipe.model, pipe.schedule, image_shape=(3, 8, 8), device="cpu")
        assert run.default_sampler_options() == ("dpmpp_2m", {}, "")
        run.sample(2, sampler="ddim", num_steps=2)


def test_a_folder_spacing_says_it_does_not_carry_to_the_singlestep_solver(diffusers, unet, tmp_path):
    """DPMSolverSinglestepScheduler has no timestep_spacing or steps_offset (diffusers' from_config drops them): a
    leading + offset folder's dpmpp_2s runs linspace, and the one-line note names both; its own folder says nothing."""
    diffusers.DDPMPipeline(unet, diffusers.DDIMScheduler(steps_offset=1)).save_pretrained(tmp_path / "ddim")
    pipe = dk.Pipeline.from_diffusers(tmp_path / "ddim", device="cpu")
    name, options, note = pipe.default_sampler_options("dpmpp_2s")
    assert options["timestep_spacing"] == "linspace" and "steps_offset" not in options
    assert note.count("\n") == 0 and "dpmpp_2s" in note
    assert "timestep_spacing='leading'" in note and "steps_offset=1" in note and "clip_sample=True" in note
    diffusers.DDPMPipeline(unet, diffusers.DPMSolverSinglestepScheduler()).save_pretrained(tmp_path / "single")
    own = dk.Pipeline.from_diffusers(tmp_path / "single", device="cpu")
    assert own.default_sampler_options() == ("dpmpp_2s", {"timestep_spacing": "linspace", "use_karras_sigmas": False},
                                             "")
    assert own.default_sampler_options("dpmpp_3s")[2] == ""


def test_stable_diffusion_layout_with_sd_scheduler_matches(diffusers, tmp_path):
    """A tiny random StableDiffusionPipeline folder with SD 1.x's own PNDM config: guidance 7.5, 10 steps, same
    latents; the folder's default sampler (plms, leading + steps_offset=1, set_alpha_to_one=False)."""
    transformers = pytest.importorskip("transformers", reason="the SD layout needs a CLIP text encoder")
    transformers.utils.logging.set_verbosity_error()
    import test_interop_t2i as t2i                    # its tiny components and tokenizer
    tokenizer = t2i._clip_tokenizer(transformers, tmp_path / "tokenizer_files")
    folder = t2i._save((diffusers, transformers), tmp_path / "sd", tokenizer)
    path = folder / "scheduler" / "scheduler_config.json"
    sd = {**diffusers.PNDMScheduler(**SD_SCHEDULER).config, "clip_sample": False, "_class_name": "PNDMScheduler"}
    path.write_text(json.dumps(sd))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    pipe = dk.Pipeline.from_diffusers(folder, device="cpu", precision="fp32")
    assert pipe.default_sampler_options()[:2] == ("plms", {"timestep_spacing": "leading", "steps_offset": 1,
                                                           "set_alpha_to_one": False})
    prompts = ["a photo of a red cat", "a blue dog"]
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sd_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    sd_pipe.set_progress_bar_config(disable=True)
    call = dict(latents=latents, guidance_scale=7.5, num_inference_steps=10)
    theirs_latents = sd_pipe(prompts, output_type="latent", **call).images
    theirs = sd_pipe(prompts, output_type="pt", **call).images
    finals = []
    ours = pipe.sample(2, num_steps=10, noise=latents, prompt=prompts, guidance_scale=7.5,
                       callback=lambda info: finals.append(info.x))
    _close(finals[-1], theirs_latents, TOL)
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.9      # the VAE's images are mostly unclamped here
    assert float(((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max()) <= 1e-5
    # the check can fail: the old default (trailing spacing, final alpha 1) is far off
    old = pipe.sample(2, sampler="plms", num_steps=10, noise=latents, prompt=prompts, guidance_scale=7.5,
                      timestep_spacing="trailing", set_alpha_to_one=True)
    assert float(((old / 2 + 0.5).clamp(0, 1) - theirs).abs().max()) > 1e-3


# --- edit, inpaint and invert from a folder use its scheduler settings as sample does ----------------

def _ddim_default_folder(diffusers, unet, tmp_path):
    """The issue's folder (DDIMScheduler(): clip_sample=True, leading spacing) and DDIMPipeline's 10-step images."""
    diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(tmp_path)
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0,
                      output_type="pt").images
    return dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32"), theirs


def test_edit_from_a_folder_uses_its_scheduler(diffusers, unet, tmp_path):
    """SDEdit at strength 1 ignores the image and samples from the generator's noise: with the folder's DDIM
    (clipping that keeps eps, leading spacing) it reproduces DDIMPipeline; the old default (dpmpp_2m) does not."""
    pipe, theirs = _ddim_default_folder(diffusers, unet, tmp_path)
    image = torch.zeros(4, 3, 8, 8)
    ours = pipe.edit(image, strength=1.0, num_steps=10, generator=torch.Generator().manual_seed(0)) / 2 + 0.5
    assert float((ours - theirs).abs().max()) <= CLIPPED_DEFAULT_TOL
    with pytest.warns(UserWarning, match="clip_sample=True do not carry over to sampler 'dpmpp_2m'"):
        old = pipe.edit(image, strength=1.0, sampler="dpmpp_2m", num_steps=10, timestep_spacing="trailing",
                        generator=torch.Generator().manual_seed(0)) / 2 + 0.5
    assert float((old - theirs).abs().max()) > 0.1
    # part-way too: the same as SDEdit with that sampler written out
    sampler = dk.get_sampler("ddim", pipe.schedule, timestep_spacing="leading", clip_sample=True,
                             use_clipped_model_output=False)
    half = pipe.edit(theirs * 2 - 1, strength=0.5, num_steps=10, generator=torch.Generator().manual_seed(2))
    expected = dk.editing.sdedit(sampler, pipe.denoiser(), theirs * 2 - 1, 0.5, 10, torch.Generator().manual_seed(2))
    torch.testing.assert_close(half, expected.clamp(-1, 1), rtol=0, atol=1e-6)


def test_inpaint_from_a_folder_uses_its_scheduler(diffusers, unet, tmp_path):
    """A mask that fills every pixel keeps nothing of the image: inpainting is then plain sampling from the
    generator's first noise, and with the folder's DDIM it reproduces DDIMPipeline (the old default, trailing
    DDIM without clipping, does not)."""
    pipe, theirs = _ddim_default_folder(diffusers, unet, tmp_path)
    image, fill = torch.zeros(4, 3, 8, 8), torch.ones(1, 1, 8, 8)
    ours = pipe.inpaint(image, fill, num_steps=10, generator=torch.Generator().manual_seed(0)) / 2 + 0.5
    assert float((ours.clamp(0, 1) - theirs).abs().max()) <= CLIPPED_DEFAULT_TOL
    old = pipe.inpaint(image, fill, sampler="ddim", num_steps=10, generator=torch.Generator().manual_seed(0),
                       timestep_spacing="trailing", clip_sample=False) / 2 + 0.5
    assert float((old.clamp(0, 1) - theirs).abs().max()) > 0.1


def test_invert_from_a_folder_keeps_its_plan_and_stays_ddim(diffusers, unet, tmp_path):
    """Inversion is deterministic DDIM whatever the folder's scheduler: the plan of SD 1.x's PNDM config
    (leading, steps_offset=1, set_alpha_to_one=False) carries over, no x0 bound does (clip_sample=True here);
    and diffusers' DDIMInverseScheduler with the same settings lands on the same x_T."""
    sd = {**diffusers.PNDMScheduler(**SD_SCHEDULER).config, "clip_sample": True}
    diffusers.DDPMPipeline(unet, diffusers.PNDMScheduler.from_config(sd)).save_pretrained(tmp_path)
    pipe = dk.Pipeline.from_diffusers(tmp_path, device="cpu", precision="fp32")
    ddim = pipe.ddim()
    assert (ddim.name, ddim.timestep_spacing, ddim.steps_offset, ddim.options["eta"]) == ("ddim", "leading", 1, 0.0)
    assert ddim.options["set_alpha_to_one"] is False and not ddim.bounds.active
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x_T = pipe.invert(image, num_steps=10)
    inverse = diffusers.DDIMInverseScheduler.from_config(sd, clip_sample=False)
    inverse.set_timesteps(10)
    x = image
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(unet(x, t).sample, t, x).prev_sample
    _close(x_T, x, TOL)
    # the check can fail: the old inversion (trailing, final alpha 1, no offset) is far off
    old = dk.editing.invert(pipe.sampler_for("ddim", eta=0.0), pipe.denoiser(), image, 10)
    assert float(((old - x).abs() / (1 + x.abs())).max()) > 0.1
