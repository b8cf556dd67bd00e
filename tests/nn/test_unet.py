"""Tests for the networks: UNet shapes, embeddings, conditioning, precision, learning; classifier."""
import math

import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.nn.classifier import ClassifierConfig, NoiseAwareClassifier
from diffusekit.nn.embeddings import timestep_embedding
from diffusekit.nn.unet import PRESETS, UNet, UNetConfig
from repo_paths import FIXTURES


def _perturb(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """Give zero-initialised layers small random weights so the output depends on every input."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def test_lean_preset_keeps_the_parameters_and_halves_the_flops():
    from torch.utils.flop_counter import FlopCounterMode

    def params_and_flops(name):
        model = UNet(UNetConfig.preset(name)).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 1, 28, 28), torch.tensor([500.0]))
        return sum(p.numel() for p in model.parameters()), counter.get_total_flops()

    (p_full, f_full), (p_lean, f_lean) = params_and_flops("mnist28"), params_and_flops("mnist28-lean")
    assert 0.8 < p_lean / p_full < 1.0
    assert f_lean / f_full < 0.55


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_output_shape(name):
    cfg = UNetConfig.preset(name)
    model = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        y = model(x, torch.tensor([3.0, 999.5]))
    assert y.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert cfg.out_channels == cfg.in_channels


def test_out_channels_and_timestep_forms():
    cfg = UNetConfig.preset("tiny8", out_channels=2)
    model = UNet(cfg).eval()
    _perturb(model, torch.Generator().manual_seed(0))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y_int = model(x, torch.tensor([7, 7, 7]))
        y_float = model(x, torch.full((3,), 7.0))
        y_scalar = model(x, 7)
        y_0d = model(x, torch.tensor(7.0))
    assert y_int.shape == (3, 2, 8, 8)
    for y in (y_float, y_scalar, y_0d):
        torch.testing.assert_close(y, y_int)


def test_bad_image_size_message():
    with pytest.raises(ConfigError, match=r"image_size=30 is not divisible by 8 \(the UNet downsamples 3 times\)"
                                          r"; use a multiple of 8, such as 32"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2, 2), attention_resolutions=())
    # 28 with two downsamples is fine: 28 -> 14 -> 7
    UNetConfig(image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(7,))
    with pytest.raises(ConfigError, match="unknown UNet preset"):
        UNetConfig.preset("cifar")


def test_time_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.25, 999.0])
    dim = 16
    emb = timestep_embedding(t, dim)
    expected = torch.zeros(4, dim, dtype=torch.float64)
    for b, tb in enumerate(t.tolist()):
        for i in range(dim // 2):
            freq = 10000.0 ** (-i / (dim // 2))
            expected[b, i] = math.cos(tb * freq)
            expected[b, dim // 2 + i] = math.sin(tb * freq)
    torch.testing.assert_close(emb.double(), expected, atol=1e-4, rtol=0)
    assert timestep_embedding(t, 7).shape == (4, 7)


def test_class_conditioning_and_null_class():
    cfg = UNetConfig.preset("tiny8", num_classes=3)
    model = UNet(cfg).eval()
    _perturb(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        y0 = model(x, t, class_labels=torch.tensor([0, 0]))
        y1 = model(x, t, class_labels=torch.tensor([1, 1]))
        y_none = model(x, t)
        y_null = model(x, t, class_labels=torch.tensor([3, 3]))
        y_minus = model(x, t, class_labels=torch.tensor([-1, -1]))
        y_mixed = model(x, t, class_labels=torch.tensor([0, -1]))
    assert (y0 - y1).abs().max() > 1e-3
    torch.testing.assert_close(y_null, y_none)
    torch.testing.assert_close(y_minus, y_none)
    torch.testing.assert_close(y_mixed[0], y0[0])
    torch.testing.assert_close(y_mixed[1], y_none[1])
    with pytest.raises(ValueError, match="class_labels contains 4"):
        model(x, t, class_labels=torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(UNetConfig.preset("tiny8"))(x, t, class_labels=torch.tensor([0, 1]))


def test_fresh_unet_outputs_exact_zero():
    for cfg in (UNetConfig.preset("tiny8"), UNetConfig.preset("tiny8", num_classes=10, use_scale_shift_norm=False)):
        y = UNet(cfg)(torch.randn(4, 1, 8, 8), torch.rand(4) * 1000)
        assert torch.equal(y, torch.zeros_like(y))


def test_bf16_autocast_channels_last_close_to_fp32():
    cfg = UNetConfig.preset("mnist28", num_classes=10)
    model = UNet(cfg).eval()
    _perturb(model, torch.Generator().manual_seed(3), scale=0.02)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 1, 28, 28, generator=g)
    t = torch.tensor([0.0, 10.0, 400.0, 999.0])
    labels = torch.tensor([0, 3, 9, -1])
    with torch.no_grad():
        ref = model(x, t, labels)
        model_cl = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model_cl(x.contiguous(memory_format=torch.channels_last), t, labels)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"


def test_tiny_unet_learns_eps_prediction():
    g = torch.Generator().manual_seed(0)
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_heads=2, groups=4, num_classes=2)
    model = UNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    # x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,  linear betas   (DDPM eq. 4)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
    x0 = torch.zeros(16, 1, 8, 8)
    x0[:8, :, 2:6, 2:6] = 1.0                                          # squares (class 0), blank (class 1)
    x0 = x0 * 2 - 1
    labels = torch.tensor([0] * 8 + [1] * 8)
    t = torch.randint(0, 1000, (16,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x_t, t, labels), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=0.2)                    # zero output: loss = E[eps^2]
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def test_classifier_shapes_and_learning():
    cfg = ClassifierConfig(image_size=8, in_channels=1, num_classes=2, base_channels=16, channel_mult=(1, 2),
                           attention_resolutions=(4,), num_heads=2, groups=4)
    torch.manual_seed(0)  # test-only: parameter init
    clf = NoiseAwareClassifier(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g) * 0.3
    y = torch.tensor([0, 1] * 8)
    x = x + torch.where(y == 0, -1.0, 1.0).view(-1, 1, 1, 1)           # two trivially separable classes
    assert clf(x).shape == (16, 2)
    assert clf(x, torch.full((16,), 250.0)).shape == (16, 2)
    assert clf.features(x).shape == (16, clf.num_features)
    torch.testing.assert_close(clf(x), clf(x, torch.zeros(16)))       # t None means t = 0
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc == 1.0 and loss.item() < 0.3


def test_classifier_reuses_unet_blocks():
    from diffusekit.nn.unet import Encoder
    ucfg = UNetConfig.preset("mnist28")
    ccfg = ClassifierConfig.from_unet(ucfg, num_classes=10)
    assert (ccfg.image_size, ccfg.channel_mult, ccfg.groups) == (28, ucfg.channel_mult, ucfg.groups)
    assert isinstance(NoiseAwareClassifier(ccfg).encoder, Encoder)


def test_config_json_round_trip(tmp_path):
    for name in PRESETS:
        cfg = UNetConfig.preset(name, num_classes=10, dropout=0.1)
        path = tmp_path / f"{name}.json"
        cfg.to_json(path)
        assert UNetConfig.from_json(path) == cfg
    ccfg = ClassifierConfig(num_classes=5)
    assert ClassifierConfig.from_dict(ccfg.to_dict()) == ccfg
    with pytest.raises(ConfigError, match="did you mean 'num_heads'"):
        UNetConfig.from_dict({"num_head": 4})


def test_unchanged_config_keeps_v1_parameters_and_outputs():
    """A text-free UNet loads weights saved by the first release and gives its outputs exactly.

    tests/fixtures/unet_v1_golden.safetensors was written by the UNet of commit a14d05b (before text
    conditioning): two small class-conditional configs (AdaGN and additive time embedding), their
    perturbed weights, an input batch and the outputs that code computed for it.
    """
    from safetensors.torch import load_file
    golden = load_file(FIXTURES / "unet_v1_golden.safetensors")
    for tag, scale_shift in (("adagn", True), ("add", False)):
        cfg = UNetConfig(image_size=8, in_channels=1, base_channels=4, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), num_heads=2, groups=2, num_classes=3,
                         use_scale_shift_norm=scale_shift)
        model = UNet(cfg).eval()
        prefix = f"{tag}.weights."
        weights = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            y = model(golden[f"{tag}.x"], golden[f"{tag}.t"], golden[f"{tag}.labels"])
        torch.testing.assert_close(y, golden[f"{tag}.y"], rtol=0, atol=1e-6)


def test_28x28_images_get_the_lean_preset_unless_another_is_named():
    from diffusekit.store.run_config import model_config
    lean, full = UNetConfig.preset("mnist28-lean"), UNetConfig.preset("mnist28")
    default = model_config(28, 1, 10)
    assert (default.base_channels, default.channel_mult) == (lean.base_channels, lean.channel_mult)
    assert default.num_classes == 10
    named = model_config(28, 1, 10, preset="mnist28")
    assert (named.base_channels, named.channel_mult) == (full.base_channels, full.channel_mult)
