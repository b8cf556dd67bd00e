"""Tests for the KL autoencoder: shapes, the Gaussian posterior, latent scaling, learning; diffusers adapter."""
import math

import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.nn.autoencoder import (AutoencoderConfig, DiagonalGaussian, KLAutoencoder,
                                       load_diffusers_autoencoder)


def _tiny(**overrides) -> AutoencoderConfig:
    return AutoencoderConfig(**{**dict(in_channels=3, base_channels=8, channel_mult=(1, 2, 2), latent_channels=4,
                                       groups=4), **overrides})


@pytest.mark.parametrize("channel_mult,factor", [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
@pytest.mark.parametrize("attention", [False, True])
def test_shapes_for_factor_4_and_8(channel_mult, factor, attention):
    cfg = _tiny(channel_mult=channel_mult, attention=attention, num_heads=2)
    ae = KLAutoencoder(cfg).eval()
    assert cfg.downsample_factor == factor
    x = torch.rand(2, 3, 32, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        x_rec = ae.decode(z)
    assert z.shape == (2, 4, 32 // factor, 16 // factor) == (2, *ae.latent_shape((3, 32, 16)))
    assert x_rec.shape == x.shape
    with pytest.raises(ValueError, match=f"not divisible by the autoencoder's downsampling factor {factor}"):
        ae.latent_shape((3, 30, 32))
    with pytest.raises(ValueError, match=r"expects \(3, H, W\)"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 3, 8, 8))


def test_kl_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g)
    logvar = torch.randn(3, 4, 5, 5, generator=g)
    q = DiagonalGaussian(mean, logvar)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(normal, standard).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(DiagonalGaussian(mean, torch.zeros_like(mean)).kl(), 0.5 * mean.pow(2).flatten(1).sum(1))


def test_posterior_sample_statistics_and_generator():
    mean = torch.full((1, 4, 64, 64), 0.7)
    logvar = torch.full_like(mean, math.log(0.25))                   # std 0.5
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(torch.Generator().manual_seed(1))
    n = z.numel()
    assert abs(z.mean().item() - 0.7) < 5 * 0.5 / math.sqrt(n)
    assert abs(z.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)
    assert torch.equal(z, q.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(q.mode(), mean)


def test_scaling_factor_round_trip():
    torch.manual_seed(0)  # test-only: parameter init
    plain = KLAutoencoder(_tiny()).eval()
    scaled = KLAutoencoder(_tiny(scaling_factor=2.5)).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_plain, z_scaled = plain.encode(x), scaled.encode(x)
        torch.testing.assert_close(z_scaled, 2.5 * z_plain)
        torch.testing.assert_close(scaled.decode(z_scaled), plain.decode(z_plain))
        torch.testing.assert_close(z_plain, plain.posterior(x).mode())
        # sample=True draws from the posterior: reproducible per generator, scaled alike
        s1 = scaled.encode(x, torch.Generator().manual_seed(3), sample=True)
        s2 = plain.encode(x, torch.Generator().manual_seed(3), sample=True)
    torch.testing.assert_close(s1, 2.5 * s2)
    assert not torch.allclose(s1, z_scaled)
    # 1 / std of the unscaled latents brings them to unit standard deviation
    latents = 3.0 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    factor = plain.compute_scaling_factor(latents)
    assert (latents * factor).std().item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="std"):
        plain.compute_scaling_factor(torch.ones(4, 4, 2, 2))


def test_loss_parts_and_kl_weight():
    torch.manual_seed(0)  # test-only: parameter init
    ae = KLAutoencoder(_tiny(loss="mse", kl_weight=0.5))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    total, parts = ae.loss(x, torch.Generator().manual_seed(0))
    # total = rec + kl_weight * KL / (C * H * W)
    torch.testing.assert_close(total.detach(), parts["rec"] + 0.5 * parts["kl"] / (3 * 16 * 16))
    assert parts["kl"] > 0 and parts["rec"] > 0
    # the same generator draws the same latent sample, so the same loss
    total2, _ = ae.loss(x, torch.Generator().manual_seed(0))
    assert torch.equal(total, total2)


def test_tiny_autoencoder_overfits_a_few_images():
    torch.manual_seed(0)  # test-only: parameter init
    ae = KLAutoencoder(_tiny(base_channels=16, groups=8, loss="mse"))
    x = -torch.ones(4, 3, 16, 16)
    x[0, 0, 2:8, 2:8] = 1.0                                           # a red square
    x[1, 1, 8:14, 4:12] = 1.0                                         # a green bar
    x[2, 2, 4:12, 8:14] = 1.0                                         # a blue bar
    x[3, :, 5:11, 5:11] = 0.5                                         # a grey square

    def mse() -> float:
        with torch.no_grad():
            return (ae.decode(ae.encode(x)) - x).pow(2).mean().item()

    before = mse()
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss, _ = ae.loss(x, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mse()
    assert after < before / 20, f"reconstruction MSE {before:.4f} -> {after:.4f}"


def test_config_checks_and_json(tmp_path):
    cfg = _tiny(channel_mult=(1, 2, 2, 4), kl_weight=1e-5, loss="mse", scaling_factor=0.3)
    cfg.to_json(tmp_path / "ae.json")
    assert AutoencoderConfig.from_json(tmp_path / "ae.json") == cfg
    with pytest.raises(ConfigError, match="groups=32 does not divide 8 channels"):
        AutoencoderConfig(base_channels=8, groups=32)
    with pytest.raises(ConfigError, match="loss='l2' is not allowed"):
        AutoencoderConfig(loss="l2")
    with pytest.raises(ConfigError, match="scaling_factor"):
        AutoencoderConfig(scaling_factor=0.0)


def test_diffusers_autoencoder_adapter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)  # test-only: parameter init of the random diffusers model
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3,
                                  block_out_channels=(8, 16, 16), layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    ae = load_diffusers_autoencoder(tmp_path / "vae")
    assert ae.scaling_factor == 0.5 and ae.downsample_factor == 4
    assert ae.latent_shape((3, 32, 16)) == (4, 8, 4)
    x = torch.rand(2, 3, 32, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        ref_z = vae.encode(x).latent_dist.mode() * 0.5
        torch.testing.assert_close(z, ref_z)
        torch.testing.assert_close(ae.decode(z), vae.decode(ref_z / 0.5).sample)
        z1 = ae.encode(x, torch.Generator().manual_seed(0), sample=True)
        z2 = ae.encode(x, torch.Generator().manual_seed(0), sample=True)
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    assert load_diffusers_autoencoder(tmp_path / "vae", scaling_factor=2.0).scaling_factor == 2.0
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL folder"):
        load_diffusers_autoencoder(tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="describes a UNet2DModel, not an AutoencoderKL"):
        load_diffusers_autoencoder(tmp_path / "unet")
