"""LoRA on a diffusers Stable-Diffusion-layout base: diffusekit's adapter against diffusers' load_lora_weights.

The tiny randomly initialised StableDiffusionPipeline folder of tests/interop/test_interop_t2i.py is the base;
nothing is downloaded. The adapter's weights are random (peft starts lora_B at zero, which would
make every comparison below a comparison of the base with itself) and alpha != rank, so the
exported file's scale handling is exercised. Tolerance: 1e-5 on images in [0, 1] (float32, CPU),
as for the base models in test_interop_t2i.py.
"""
import warnings

import pytest
import torch

pytest.importorskip("peft", reason="LoRA adapters need peft (pip install -e '.[finetune]' from a clone)")

import diffusekit as dk  # noqa: E402
from diffusekit.adapters import add_adapter, save_adapter, write_merged  # noqa: E402
from diffusekit.config import ConfigError  # noqa: E402
from diffusekit.interop.lora import LORA_WEIGHT_NAME, export_diffusers_lora  # noqa: E402
from diffusekit.nn.lora import AdapterConfig, lora_targets  # noqa: E402
from test_interop_t2i import _clip_tokenizer, _save, libs  # noqa: E402,F401  (libs: a fixture)

PROMPTS = ["a photo of a red cat", "a blue dog"]
TOL = 1e-5


@pytest.fixture(scope="module")
def sd_folder(libs, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("sd-lora")
    return _save(libs, root / "sd", _clip_tokenizer(libs[1], root / "tokenizer_files"))


def _randomise_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def adapted(sd_folder, tmp_path_factory):
    """(pipe with a random adapter on the UNet's attention and the text encoder, its adapter folder)."""
    pipe = dk.Pipeline.from_diffusers(sd_folder, device="cpu", precision="fp32")
    default = lora_targets(pipe.model, AdapterConfig())           # "attention": the UNet's, not CLIP's
    assert default and all(t.startswith("unet.") and t.endswith(("to_q", "to_k", "to_v", "to_out.0")) for t in default)
    adapter = add_adapter(pipe, AdapterConfig(rank=2, alpha=6.0, targets=("attention", "text")))
    assert any(t.startswith("unet.") for t in adapter.targets) and any(t.startswith("text_encoder.model.")
                                                                      for t in adapter.targets)
    _randomise_adapter(pipe.model)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    save_adapter(pipe, out)
    return pipe, out


def _latents(pipe):
    return torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(1))


def _ours(pipe, latents, **kw):
    return (pipe.sample(2, sampler="ddim", num_steps=5, noise=latents, prompt=PROMPTS, guidance_scale=3.0,
                        timestep_spacing="trailing", clip_sample=False, **kw) / 2 + 0.5).clamp(0, 1)


def _stable_diffusion(libs, folder):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sd = libs[0].StableDiffusionPipeline.from_pretrained(folder)
    sd.set_progress_bar_config(disable=True)
    return sd


def _theirs(sd, latents, **kw):
    return sd(PROMPTS, latents=latents, output_type="pt", num_inference_steps=5, guidance_scale=3.0, **kw).images


def test_exported_lora_in_diffusers_gives_our_images(libs, sd_folder, adapted, tmp_path):  # noqa: F811
    pipe, _ = adapted
    latents = _latents(pipe)
    path = export_diffusers_lora(pipe, tmp_path / "diffusers-lora")
    assert path.name == LORA_WEIGHT_NAME == "pytorch_lora_weights.safetensors"
    sd = _stable_diffusion(libs, sd_folder)
    base = _theirs(sd, latents)
    sd.load_lora_weights(tmp_path / "diffusers-lora")
    theirs = _theirs(sd, latents)
    assert (theirs - base).abs().max() > 1e-2                       # the LoRA changes diffusers' images
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.5      # not a comparison of clamped values
    torch.testing.assert_close(_ours(pipe, latents), theirs, rtol=0, atol=TOL)
    # diffusers' LoRA scale is our lora_scale (UNet and text encoder alike)
    half = _theirs(sd, latents, cross_attention_kwargs={"scale": 0.5})
    assert (half - theirs).abs().max() > 1e-3
    torch.testing.assert_close(_ours(pipe, latents, lora_scale=0.5), half, rtol=0, atol=TOL)
    with pytest.raises(ConfigError, match="exists; give another folder"):
        export_diffusers_lora(pipe, tmp_path / "diffusers-lora")


def test_adapter_folder_on_a_diffusers_base_loads_exports_and_merges(libs, sd_folder, adapted, tmp_path):  # noqa: F811
    pipe, folder = adapted
    latents = _latents(pipe)
    ours = _ours(pipe, latents)
    loaded = dk.Pipeline.load(folder, device="cpu", precision="fp32")
    assert loaded.adapter.base["kind"] == "diffusers"
    torch.testing.assert_close(_ours(loaded, latents), ours, rtol=0, atol=0)
    assert torch.equal(_ours(loaded, latents, lora_scale=0.0),
                       _ours(dk.Pipeline.from_diffusers(sd_folder, device="cpu", precision="fp32"), latents))
    # the export from the adapter folder equals the export from the live pipeline
    export_diffusers_lora(folder, tmp_path / "from-folder")
    sd = _stable_diffusion(libs, sd_folder)
    sd.load_lora_weights(tmp_path / "from-folder")
    torch.testing.assert_close(_theirs(sd, latents), ours, rtol=0, atol=TOL)
    # merged into a diffusers folder: diffusekit and diffusers read it without peft layers, same images
    write_merged(loaded, tmp_path / "merged")
    merged = dk.Pipeline.from_diffusers(tmp_path / "merged", device="cpu", precision="fp32")
    assert merged.lora_scale is None
    torch.testing.assert_close(_ours(merged, latents), ours, rtol=0, atol=TOL)
    torch.testing.assert_close(_theirs(_stable_diffusion(libs, tmp_path / "merged"), latents), ours, rtol=0, atol=TOL)


def test_export_refuses_a_base_diffusers_cannot_load_a_lora_into(tmp_path):
    from diffusekit.nn.unet import UNet, UNetConfig
    pipe = dk.Pipeline(UNet(UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), groups=4,
                               attention_resolutions=(4,), num_heads=2)),
               dk.NoiseSchedule.create("linear", num_train_timesteps=10), image_shape=(1, 8, 8), source=str(tmp_path))
    add_adapter(pipe, AdapterConfig(rank=2))
    with pytest.raises(ConfigError, match="the adapter's base is a UNet; diffusers' load_lora_weights reads LoRAs of "
                                          "StableDiffusionPipeline folders"):
        export_diffusers_lora(pipe, tmp_path / "out")


def test_adapter_on_a_ddpm_folder_unet2dmodel_saves_loads_and_merges(libs, tmp_path):  # noqa: F811
    """A diffusers UNet2DModel (DDPMPipeline folder): attention and convolution LoRA, round trip, merged folder."""
    from diffusekit.interop import DiffusersUNet
    diffusers = libs[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     attention_head_dim=8)
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    pipe = dk.Pipeline.from_diffusers(tmp_path / "ddpm", device="cpu", precision="fp32")
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    base = pipe.sample(2, sampler="ddim", num_steps=4, noise=noise)
    adapter = add_adapter(pipe, AdapterConfig(rank=4, targets=("attention", "conv")))
    assert {t.rsplit(".", 1)[-1] for t in adapter.targets} >= {"to_q", "to_k", "to_v", "0", "conv1", "conv2"}
    assert "unet.conv_in" not in adapter.targets and "unet.conv_out" not in adapter.targets
    _randomise_adapter(pipe.model)
    ours = pipe.sample(2, sampler="ddim", num_steps=4, noise=noise)
    assert (ours - base).abs().max() > 1e-3
    save_adapter(pipe, tmp_path / "adapter")
    loaded = dk.Pipeline.load(tmp_path / "adapter", device="cpu", precision="fp32")
    torch.testing.assert_close(loaded.sample(2, sampler="ddim", num_steps=4, noise=noise), ours, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="the adapter's base is a DiffusersUNet"):
        export_diffusers_lora(loaded, tmp_path / "lora")
    # the network itself (DDPM's default schedule amplifies eps by up to 1 / sqrt(abar_T) ~ 160 in x0)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        adapted = loaded.model(noise, t)
        write_merged(loaded, tmp_path / "merged")
        merged = dk.Pipeline.from_diffusers(tmp_path / "merged", device="cpu", precision="fp32")
        assert merged.lora_scale is None and (adapted - DiffusersUNet(unet)(noise, t)).abs().max() > 1e-3
        torch.testing.assert_close(merged.model(noise, t), adapted, rtol=0, atol=1e-5)
