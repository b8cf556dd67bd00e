"""Edits checked against the value they must reach, not only their shape (issue 23).

SDEdit's contract (editing.sdedit): strength 0 returns the input, strength 1 is exactly plain
sampling from the same generator's noise, and strength S noises the image to the plan's level at
start_step = steps - round(S * steps) by q(x_t | x0) and runs the sampler from there. Checked for
every registered sampler on an imported diffusers pipeline, and with prompts on a text model, where
the prompt must reach the edit (the same prompt as sampling gives the same image, another one not).
"""
import math

import pytest
import torch

import diffusekit as dk
from diffusekit.nn.network import TextToImageModel
from diffusekit.nn.text import LearnedTextEncoder, build_vocab
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule


SCALE = 0.2                    # random weights: a fresh UNet's zero-initialised branches would output 0


def g():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     attention_head_dim=8)
    path = tmp_path_factory.mktemp("ddpm") / "pipe"
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler()).save_pretrained(path)
    return dk.Pipeline.from_diffusers(path, device="cpu")


@pytest.mark.parametrize("name", sorted(dk.SAMPLERS))
def test_every_sampler_edits_at_strength_one_exactly_as_it_samples(imported, name):
    image = torch.linspace(-0.8, 0.8, 3 * 64).view(1, 3, 8, 8)
    edited = imported.edit(image, strength=1.0, sampler=name, num_steps=3, generator=g())
    sampled = imported.sample(1, sampler=name, num_steps=3, generator=g())
    torch.testing.assert_close(edited, sampled, rtol=0, atol=1e-6)
    assert torch.equal(imported.edit(image, strength=0.0, sampler=name, num_steps=3, generator=g()), image)


def _sdedit_by_hand(pipe, image, strength, steps, **cond):
    """SDEdit written out: forward-noise to the plan's level at start_step, then the sampler from there."""
    sampler = pipe.resolve_sampler("ddim")     # with what carries over from the folder's scheduler
    _, abars = sampler.plan(steps)
    start = steps - round(strength * steps)
    generator = g()
    noise = torch.randn(image.shape, generator=generator)
    abar = float(abars[start])
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps   (DDPM eq. 4)
    x_t = math.sqrt(abar) * image + math.sqrt(1 - abar) * noise
    return sampler.sample(pipe.denoiser(), x_t, steps, generator=generator, start_step=start, **cond).clamp(-1, 1)


def test_half_strength_edit_is_the_forward_noised_image_denoised(imported):
    image = torch.linspace(-0.8, 0.8, 3 * 64).view(1, 3, 8, 8)
    edited = imported.edit(image, strength=0.5, sampler="ddim", num_steps=4, generator=g())
    torch.testing.assert_close(edited, _sdedit_by_hand(imported, image, 0.5, 4), rtol=0, atol=1e-6)
    # the image matters: another input gives another edit
    assert (imported.edit(-image, strength=0.5, sampler="ddim", num_steps=4, generator=g()) - edited).abs().max() > 1e-3


@pytest.fixture(scope="module")
def text_pipe():
    torch.manual_seed(0)
    encoder = LearnedTextEncoder(build_vocab(["a red circle", "a blue square"]), dim=8, layers=1, heads=2)
    unet = UNet(UNetConfig(image_size=8, in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(4,), num_heads=1, groups=4, text_conditioning="both",
                           context_dim=8))
    model = TextToImageModel(unet, encoder, trainable_text=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():      # a fresh UNet outputs exactly 0 (zero-initialised branches): randomise it all
        for p in model.parameters():
            p.copy_(SCALE * torch.randn(p.shape, generator=gen))
    # an x0-predicting model: random eps would be divided by sqrt(abar_T) ~ 0.006 and clamp every pixel
    return Pipeline(model, NoiseSchedule.create("linear"), image_shape=(3, 8, 8), prediction_type="sample",
                    device="cpu")


def test_a_text_edit_follows_its_prompt(text_pipe):
    image = torch.linspace(-0.8, 0.8, 3 * 64).view(1, 3, 8, 8)
    red = text_pipe.edit(image, 1.0, "ddim", 3, g(), prompt="a red circle")
    torch.testing.assert_close(red, text_pipe.sample(1, "ddim", 3, generator=g(), prompt="a red circle"),
                               rtol=0, atol=1e-6)
    blue = text_pipe.sample(1, "ddim", 3, generator=g(), prompt="a blue square")
    assert (red.abs() < 0.99).float().mean() > 0.5               # values, not a comparison of clamped pixels
    assert (red - blue).abs().mean() > 1e-3                      # the prompt reached the edit (round-off: 1e-7)
    half = text_pipe.edit(image, 0.5, "ddim", 4, g(), prompt="a blue square")
    cond = text_pipe.model.encode_text(["a blue square"])
    torch.testing.assert_close(half, _sdedit_by_hand(text_pipe, image, 0.5, 4, **cond), rtol=0, atol=1e-6)
    guided = text_pipe.edit(image, 1.0, "ddim", 3, g(), prompt="a red circle", guidance_scale=3.0,
                            negative_prompt="a blue square")
    torch.testing.assert_close(guided, text_pipe.sample(1, "ddim", 3, generator=g(), prompt="a red circle",
                                                        guidance_scale=3.0, negative_prompt="a blue square"),
                               rtol=0, atol=1e-6)
    assert (guided - red).abs().mean() > 1e-3
