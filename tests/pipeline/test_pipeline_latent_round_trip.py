"""Pipeline.encode -> Pipeline.decode on a trained autoencoder gives the autoencoder's own reconstruction.

The latents a Pipeline denoises are z * scaling_factor; decode must divide by the scale exactly once.
Dividing twice (or not at all) decodes z * s^{+-1} instead of z, which shape and finiteness checks
do not see; the round trip against the autoencoder's decoder on the unscaled posterior mode does.
"""
import math

import pytest
import torch

from diffusekit.store.autoencoder import load_autoencoder
from diffusekit.training.autoencoder import autoencoder_run_config, train_autoencoder
from diffusekit.data import DataConfig, load_dataset
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule

SHAPES = DataConfig(source="shapes", limit=32, image_size=16)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.fixture(scope="module")
def latent_pipe(tmp_path_factory):
    data = load_dataset(SHAPES)
    cfg = autoencoder_run_config(SHAPES, data, {"base_channels": 8, "groups": 4}, steps=4, batch_size=16,
                                 save_every=4, log_every=2, device="cpu", eval_images=16, scaling_images=32)
    out = tmp_path_factory.mktemp("ae") / "ae"
    train_autoencoder(cfg, out, progress=False, dataset=data)
    ae = load_autoencoder(out, device="cpu")              # what Pipeline.load uses for RUN/autoencoder
    c, h, w = ae.latent_shape((3, 16, 16))
    unet = UNet(UNetConfig(image_size=h, in_channels=c, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                           attention_resolutions=(), num_heads=1, groups=4))
    pipe = Pipeline(unet, NoiseSchedule.create("linear"), image_shape=(3, 16, 16), latent_shape=(c, h, w),
                    autoencoder=ae, device="cpu")
    return pipe, ae, data.images[:16]


def test_encode_then_decode_is_the_autoencoders_own_reconstruction(latent_pipe):
    pipe, ae, x = latent_pipe
    # the scale is learned from the data (1 / std of the latents): far enough from 1 to matter
    assert abs(ae.scaling_factor - 1) > 0.2
    with torch.no_grad():
        own = ae.decoder(ae.posterior(x).mode())           # unscaled latents through the decoder
        z = pipe.encode(x)
        torch.testing.assert_close(z, ae.posterior(x).mode() * ae.scaling_factor)
        round_trip = pipe.decode(z)
    assert psnr(round_trip, own) > 60                      # the same images up to float round-off
    assert psnr(round_trip.clamp(-1, 1), x) == pytest.approx(psnr(own.clamp(-1, 1), x), abs=1e-3)


def test_sampled_latents_are_decoded_once(latent_pipe):
    pipe, ae, _ = latent_pipe
    noise = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    latents = []
    images = pipe.sample(2, "ddim", 2, noise=noise, callback=lambda info: latents.append(info.x))
    with torch.no_grad():
        expected = ae.decoder(latents[-1] / ae.scaling_factor).float().clamp(-1, 1)
    assert psnr(images, expected) > 60
