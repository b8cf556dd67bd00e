"""Latent diffusion end to end: an autoencoder, a text-conditioned UNet on its latents, and every
Pipeline operation through encode/decode (tiny models on the built-in shapes)."""
import pytest
import torch

from diffusekit.training.autoencoder import autoencoder_run_config, train_autoencoder
from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, load_dataset
from diffusekit.pipeline import Pipeline
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training import train

SHAPES = DataConfig(source="shapes", limit=64)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    data = load_dataset(SHAPES)
    cfg = autoencoder_run_config(SHAPES, data, {"base_channels": 8, "groups": 4}, steps=6, batch_size=16,
                                 save_every=6, log_every=2, device="cpu", eval_images=16, scaling_images=64)
    out = tmp_path_factory.mktemp("ae") / "ae"
    train_autoencoder(cfg, out, progress=False, dataset=data)
    return out


@pytest.fixture(scope="module")
def latent_run(autoencoder, tmp_path_factory):
    cfg, data = resolve_run_config({
        "data.source": "shapes", "data.limit": 64, "latent.autoencoder": str(autoencoder), "text.kind": "learned",
        "text.dim": 16, "text.layers": 1, "text.heads": 2, "model.base_channels": 8, "model.channel_mult": (1, 2),
        "model.groups": 4, "model.attention_resolutions": (4,), "model.num_heads": 2, "train.steps": 6,
        "train.batch_size": 16, "train.save_every": 6, "train.sample_every": 6, "train.num_sample_images": 4,
        "train.sample_steps": 2, "train.device": "cpu"})
    out = tmp_path_factory.mktemp("ldm") / "run"
    train(cfg, out, dataset=data, progress=False)
    return out, cfg


def test_the_run_records_its_autoencoder_and_caches_latents(latent_run):
    out, cfg = latent_run
    assert cfg.latent is not None and (cfg.model.in_channels, cfg.model.image_size) == (4, 8)
    assert (out / "autoencoder" / "model.safetensors").exists()
    assert len(list(out.glob("latents-*.safetensors"))) == 1
    assert (out / "samples" / "step_000006.png").exists()


def test_pipeline_decodes_and_edits_through_the_autoencoder(latent_run):
    out, _ = latent_run
    pipe = Pipeline.load(out, device="cpu")
    assert pipe.image_shape == (3, 32, 32) and pipe.latent_shape == (4, 8, 8)
    g = lambda: torch.Generator().manual_seed(0)              # noqa: E731
    x = pipe.sample(2, "ddim", 3, generator=g(), prompt="a large red circle on the left", guidance_scale=2.0)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    image = load_dataset(SHAPES).images[:1]
    edited = pipe.edit(image, 0.5, "ddim", 4, g(), prompt="a small blue square at the top")
    assert edited.shape == (1, 3, 32, 32)
    x_T = pipe.invert(image, 4, prompt="a small blue square at the top")
    assert x_T.shape == (1, 4, 8, 8)
    assert pipe.reconstruct(x_T, 4).shape == (1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1
    filled = pipe.inpaint(image, mask, "ddim", 4, g())
    # the known half is the input exactly: pasted back in pixel space
    assert torch.equal(filled[..., :16, :], image[..., :16, :])


def test_autoencoder_that_does_not_fit_the_data_is_refused(autoencoder):
    with pytest.raises(ConfigError, match="channel"):
        resolve_run_config({"data.source": "digits", "latent.autoencoder": str(autoencoder)})
