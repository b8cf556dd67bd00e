"""The autoencoder's optional patch-GAN term: its math, its discriminator, exact resume and the weights contract."""
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from diffusekit import store as ckpt
from diffusekit.cli import main
from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, load_dataset
from diffusekit.nn.autoencoder import AutoencoderConfig, KLAutoencoder
from diffusekit.nn.discriminator import PatchDiscriminator
from diffusekit.store.autoencoder import (AutoencoderRunConfig, AutoencoderTrainConfig, cpu_autoencoder_config,
                                          load_autoencoder, read_autoencoder_config)
from diffusekit.training.adversarial import (MAX_ADAPTIVE_WEIGHT, Adversary, adaptive_weight, hinge_d_loss,
                                             hinge_g_loss)
from diffusekit.training.autoencoder import train_autoencoder

GAN = dict(adversarial_weight=0.5, adversarial_start=3, discriminator_channels=8, discriminator_layers=2)


def tiny(steps=8, save_every=4, **ae) -> AutoencoderRunConfig:
    """A handful of channels on 64 shapes at 16x16 (latents 4x4), a few steps."""
    return AutoencoderRunConfig(
        autoencoder=cpu_autoencoder_config(base_channels=8, groups=4, **ae),
        data=DataConfig(source="shapes", limit=64, image_size=16),
        train=AutoencoderTrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, ema_decay=0.9, log_every=2,
                                     save_every=save_every, device="cpu", num_grid_images=2, eval_images=6))


def test_hinge_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    # 1/2 (mean(max(0, 1 - r)) + mean(max(0, 1 + f))) = 1/2 ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(2.0 / 3)


def test_adaptive_weight_against_its_closed_form():
    """Last layer y = W a; rec = |y - t|^2 and L_G = -c.y give grads 2 (y - t) a^T and -c a^T, so
    lambda = 2 |y - t| |a| / (|c| |a| + 1e-4)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 3, generator=g, requires_grad=True)
    a, t, c = torch.randn(3, generator=g), torch.randn(2, generator=g), torch.randn(2, generator=g)
    y = W @ a
    rec, g_loss = (y - t).pow(2).sum(), -(c * y).sum()
    expected = 2 * (y - t).norm() * a.norm() / (c.norm() * a.norm() + 1e-4)
    lam = adaptive_weight(rec, g_loss, W)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5) and not lam.requires_grad
    # both graphs were kept: the total loss can still be backpropagated
    (rec + lam * g_loss).backward()
    torch.testing.assert_close(W.grad, (2 * (y - t) - lam * c).detach()[:, None] * a[None])
    # a GAN gradient of zero must not blow the weight up: the clamp holds it at 1e4
    flat = adaptive_weight((W @ a - t).pow(2).sum(), (W * 0).sum(), W)
    assert flat.item() == MAX_ADAPTIVE_WEIGHT


def test_discriminator_learns_to_tell_real_from_blurred():
    """100 AdamW steps of the hinge loss separate shapes from their 2x2-blurred copies, on held-out images too."""
    images = load_dataset(DataConfig(source="shapes", limit=96, image_size=16)).images
    blur = lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")     # noqa: E731
    train, test = images[:64], images[64:]
    torch.manual_seed(0)    # test-only: the discriminator's initial weights
    adv = Adversary(AutoencoderConfig(**{**GAN, "adversarial_start": 0}), torch.device("cpu"), "fp32")
    with torch.no_grad():
        before = hinge_d_loss(adv.discriminator(test), adv.discriminator(blur(test))).item()
    for step in range(100):
        x = train[(step * 16) % 64:][:16]
        adv.discriminator_step(x, blur(x), lr=2e-3, grad_clip=0.0)
    with torch.no_grad():
        real, fake = adv.discriminator(test).mean((1, 2, 3)), adv.discriminator(blur(test)).mean((1, 2, 3))
        after = hinge_d_loss(adv.discriminator(test), adv.discriminator(blur(test))).item()
    assert before == pytest.approx(1.0, abs=0.05) and after < 0.4       # at init D says ~0 to both
    assert ((real > 0).float().mean() + (fake < 0).float().mean()).item() / 2 >= 0.85


def test_patch_discriminator_shape_and_errors():
    d = PatchDiscriminator(3, channels=8, layers=3)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="do not halve 3 times; use sides divisible by 8"):
        d(torch.zeros(1, 3, 12, 12))


def test_off_is_the_plain_autoencoder(tmp_path):
    """Weight 0 builds no discriminator: the other GAN fields change nothing, bit for bit, and log nothing."""
    plain = train_autoencoder(tiny(), tmp_path / "plain", progress=False)
    off = train_autoencoder(tiny(**{**GAN, "adversarial_weight": 0.0}), tmp_path / "off", progress=False)
    for name in (ckpt.EMA_FILE, ckpt.RAW_FILE):
        a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "off" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert plain.psnr == off.psnr
    assert "discriminator" not in ckpt.read_trainer_state(tmp_path / "off")
    assert "d_loss" not in (tmp_path / "off" / "metrics.jsonl").read_text()


def test_gan_run_resumes_exactly_and_keeps_the_discriminator_out_of_the_weights(tmp_path):
    """2 + 2 steps with a resume (the GAN term on from step 1) equal 4 straight steps: autoencoder,
    EMA, discriminator and both optimisers. model.safetensors holds the autoencoder alone."""
    cfg = tiny(steps=4, save_every=2, **{**GAN, "adversarial_start": 1})
    first = AutoencoderRunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "steps": 2}})
    train_autoencoder(first, tmp_path / "resumed", progress=False)
    resumed = train_autoencoder(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight = train_autoencoder(cfg, tmp_path / "straight", progress=False)
    assert resumed.start_step == 2 and resumed.step == straight.step == 4
    for name in (ckpt.EMA_FILE, ckpt.RAW_FILE):
        a, b = load_file(tmp_path / "resumed" / name), load_file(tmp_path / "straight" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert a.keys() == KLAutoencoder(cfg.autoencoder).state_dict().keys()      # no discriminator.* key
    sa, sb = ckpt.read_trainer_state(tmp_path / "resumed"), ckpt.read_trainer_state(tmp_path / "straight")
    d_a, d_b = sa["discriminator"], sb["discriminator"]
    assert d_a.keys() == PatchDiscriminator(3, 8, 2).state_dict().keys()
    assert all(torch.equal(d_a[k], d_b[k]) for k in d_a)
    for key in ("optimizer", "discriminator_optimizer"):
        for i, s in sa[key]["state"].items():
            assert all(torch.equal(s[k], sb[key]["state"][i][k]) for k in s), key
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "loss" in r}
    # step 2's window holds steps 1 and 2: the GAN numbers are the mean of the one step that had them
    assert {"g_loss", "d_loss", "adaptive_weight", "logits_real", "logits_fake"} <= logged[2].keys()
    assert all(r["adaptive_weight"] > 0 for r in logged.values())
    # the weights a Pipeline loads: the autoencoder alone, as without the term
    ae = load_autoencoder(tmp_path / "straight")
    assert isinstance(ae, KLAutoencoder) and ae.config.adversarial_weight == 0.5


def test_old_configs_load_unchanged_and_bad_values_are_refused(tmp_path):
    cfg = tiny()
    old = cfg.to_dict()
    for key in ("adversarial_weight", "adversarial_start", "discriminator_channels", "discriminator_layers"):
        del old["autoencoder"][key]          # a config.json written before the option existed
    assert AutoencoderRunConfig.from_dict(old) == cfg
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_autoencoder_config(tmp_path).autoencoder.adversarial_weight == 0.0
    with pytest.raises(ConfigError, match="adversarial_weight=-0.5 is negative; use 0 \\(off\\) or a positive"):
        cpu_autoencoder_config(adversarial_weight=-0.5)
    with pytest.raises(ConfigError, match="adversarial_start=-1 is out of range"):
        AutoencoderConfig(adversarial_start=-1)
    result = CliRunner().invoke(main, ["train-autoencoder", "--data", "shapes", "--out", str(tmp_path / "ae"),
                                       "--adversarial-weight", "-0.5", "--dry-run"])
    assert result.exit_code != 0 and "adversarial_weight=-0.5 is negative" in result.output
    assert not (tmp_path / "ae").exists()
    result = CliRunner().invoke(main, ["train-autoencoder", "--data", "shapes", "--out", str(tmp_path / "ae"),
                                       "--adversarial-weight", "0.5", "--adversarial-start", "100", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert '"adversarial_weight": 0.5' in result.output and '"adversarial_start": 100' in result.output
