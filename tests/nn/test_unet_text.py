"""Tests for the text-conditioned UNet (cross-attention, multiply, both) and derived layouts for any size."""
import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.nn.attention import SpatialTransformer
from diffusekit.nn.layout import derive_unet_config, describe_layout, valid_sizes
from diffusekit.nn.text import LearnedTextEncoder, build_vocab
from diffusekit.nn.unet import UNet, UNetConfig

D = 12  # context_dim of the test "text encoder"
MODES = ["cross_attention", "multiply", "both"]


def _cfg(mode: str, **overrides) -> UNetConfig:
    return UNetConfig(**{**dict(image_size=8, in_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(4,), num_heads=2, groups=4, text_conditioning=mode,
                                context_dim=D), **overrides})


def _text(batch: int, seed: int, length: int = 5, valid: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, D, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :valid] = True
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask, "text_embeds": hidden[:, :valid].mean(1)}


def _perturb(model: torch.nn.Module, seed: int, skip=()) -> None:
    """Random weights everywhere (except parameters whose name contains one of `skip`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _text_paths(mode: str) -> tuple[str, ...]:
    # the zero-initialised parameters through which text enters: transformers' proj_out, ResBlocks' ctx_proj
    return {"cross_attention": ("proj_out",), "multiply": ("ctx_proj",), "both": ("proj_out", "ctx_proj")}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_fresh_text_unet_ignores_text_until_trained(mode):
    """What holds at init: every text path starts at zero, so the output does not depend on the text."""
    model = UNet(_cfg(mode)).eval()
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5.0, 700.0])
    y = model(x, t, **_text(2, 1))
    assert torch.equal(y, torch.zeros_like(y))                        # the zero out_conv, as without text
    transformers = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert bool(transformers) == (mode != "multiply")
    for block in transformers:                                        # proj_out = 0: exactly the identity
        h = torch.randn(2, block.norm.num_channels, 4, 4)
        assert torch.equal(block(h, _text(2, 2)["encoder_hidden_states"]), h)
    _perturb(model, seed=3, skip=_text_paths(mode))                   # everything but the text paths random
    with torch.no_grad():
        y1, y2 = model(x, t, **_text(2, 1)), model(x, t, **_text(2, 2))
    assert y1.abs().max() > 1e-2
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)
    _perturb(model, seed=4)                                           # now the text paths too
    with torch.no_grad():
        assert (model(x, t, **_text(2, 1)) - model(x, t, **_text(2, 2))).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_output_depends_on_the_prompt_after_a_few_steps(mode):
    torch.manual_seed(0)  # test-only: parameter init
    model = UNet(_cfg(mode))
    a, b = _text(1, 10), _text(1, 11)
    cond = {k: torch.cat([a[k], b[k]]) for k in a}
    target = torch.cat([torch.ones(1, 2, 8, 8), -torch.ones(1, 2, 8, 8)])   # prompt a -> +1, prompt b -> -1
    # one input image for both: only the text can tell the two targets apart
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    t = torch.full((2,), 500.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x, t, **cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        ya, yb = model(x[:1], t[:1], **a), model(x[:1], t[:1], **b)
    assert losses[0] == pytest.approx(1.0, abs=1e-6)                  # zero output at init, whatever the text
    assert losses[-1] < 0.3, losses[::5]
    assert (ya - yb).mean() > 1.0, "the two prompts should now give clearly different outputs"


@pytest.mark.parametrize("mode", ["cross_attention", "both"])
def test_masked_tokens_do_not_influence_the_output(mode):
    model = UNet(_cfg(mode)).eval()
    _perturb(model, seed=5)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = _text(2, 6, length=6, valid=2)
    changed = dict(text)
    changed["encoder_hidden_states"] = text["encoder_hidden_states"].clone()
    changed["encoder_attention_mask"] = text["encoder_attention_mask"].clone()
    changed["encoder_hidden_states"][:, 2:] = 100.0                   # the padded positions only
    with torch.no_grad():
        y = model(x, 10.0, **text)
        y_changed = model(x, 10.0, **changed)
        all_tokens = model(x, 10.0, **{**text, "encoder_attention_mask": None})
        int_mask = model(x, 10.0, **{**text, "encoder_attention_mask": text["encoder_attention_mask"].long()})
    torch.testing.assert_close(y_changed, y, rtol=0, atol=1e-6)
    assert (all_tokens - y).abs().max() > 1e-3                        # the mask did matter
    torch.testing.assert_close(int_mask, y)                           # 0/1 integer masks are read as bool


def test_batch_of_one_text_serves_the_batch_and_classes_combine():
    model = UNet(_cfg("both", num_classes=3)).eval()
    _perturb(model, seed=7)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    one, three = _text(1, 8), {k: v.expand(3, *v.shape[1:]) for k, v in _text(1, 8).items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x, 3.0, **one), model(x, 3.0, **three))
        y0 = model(x, 3.0, class_labels=torch.tensor([0, 0, 0]), **one)
        y1 = model(x, 3.0, class_labels=torch.tensor([1, 1, 1]), **one)
    assert (y0 - y1).abs().max() > 1e-3


def test_classifier_free_guidance_with_the_empty_prompt():
    from diffusekit.guidance import ClassifierFreeGuidance
    torch.manual_seed(0)  # test-only: parameter init
    encoder = LearnedTextEncoder(build_vocab(["a red circle", "a blue square"]), dim=D, layers=1, heads=2, max_length=6)
    model = UNet(_cfg("both")).eval()
    _perturb(model, seed=9)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        cond, null = encoder.encode(["a red circle", "a blue square"]), encoder.encode([""])
        y_cond, y_null = model(x, t, **cond), model(x, t, **null)
        for scale, expected in ((1.0, y_cond), (0.0, y_null), (3.0, y_null + 3.0 * (y_cond - y_null))):
            guided = ClassifierFreeGuidance(model, scale, null_cond=null)(x, t, **cond)
            torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    model = UNet(_cfg("both")).eval()
    _perturb(model, seed=11)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = _text(2, 12)
    with torch.no_grad():
        ref = model(x, 50.0, **text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.to(memory_format=torch.channels_last)(x, 50.0, **text)
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_text_keyword_errors_name_the_fix():
    x, t = torch.zeros(2, 2, 8, 8), 1.0
    cross, multiply = UNet(_cfg("cross_attention")), UNet(_cfg("multiply"))
    plain = UNet(_cfg("none", context_dim=0))
    text = _text(2, 0)
    with pytest.raises(ValueError, match="encoder_hidden_states is missing; pass the text encoder's output"):
        cross(x, t)
    with pytest.raises(ValueError, match="text_embeds is missing"):
        multiply(x, t, encoder_hidden_states=text["encoder_hidden_states"])
    multiply(x, t, text_embeds=text["text_embeds"])                   # unused keywords may be left out
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(2, 5, 7\); expected \(2, L, 12\)"):
        cross(x, t, encoder_hidden_states=torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match=r"text_embeds has shape \(3, 12\); expected \(2, 12\)"):
        multiply(x, t, text_embeds=torch.zeros(3, D))
    with pytest.raises(ValueError, match=r"encoder_attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        cross(x, t, encoder_hidden_states=text["encoder_hidden_states"], encoder_attention_mask=torch.ones(2, 4))
    empty = text["encoder_attention_mask"].clone()
    empty[1] = False
    with pytest.raises(ValueError, match="encoder_attention_mask row 1 masks every token"):
        cross(x, t, encoder_hidden_states=text["encoder_hidden_states"], encoder_attention_mask=empty)
    with pytest.raises(ValueError, match="no text conditioning"):
        plain(x, t, **text)


def test_text_config_checks_and_json(tmp_path):
    with pytest.raises(ConfigError, match="needs context_dim"):
        UNetConfig(text_conditioning="cross_attention")
    with pytest.raises(ConfigError, match="context_dim=8 is set but text_conditioning='none'"):
        UNetConfig(context_dim=8)
    with pytest.raises(ConfigError, match="text_conditioning='cross' is not allowed"):
        UNetConfig(text_conditioning="cross", context_dim=8)
    with pytest.raises(ConfigError, match="cross_attention_resolutions contains 2"):
        _cfg("cross_attention", cross_attention_resolutions=(2,))
    cfg = _cfg("both", cross_attention_resolutions=(8, 4), transformer_depth=2)
    assert _cfg("both").cross_attention_resolutions == (4,)          # defaults to attention_resolutions
    cfg.to_json(tmp_path / "unet.json")
    assert UNetConfig.from_json(tmp_path / "unet.json") == cfg
    n_transformers = sum(isinstance(m, SpatialTransformer) for m in UNet(cfg).modules())
    assert n_transformers == 2 + 1 + 2 * 2                            # encoder levels, middle, decoder (2 per level)


# --- any resolution ----------------------------------------------------------------------------

def test_derived_layouts_follow_their_rules():
    sizes = valid_sizes()
    assert sizes[0] == 8 and sizes[-1] == 256 and {28, 32, 64, 96, 128, 224} <= set(sizes)
    for size in sizes:
        cfg = derive_unet_config(size, 3)
        sides = [size // 2 ** i for i in range(len(cfg.channel_mult))]
        assert all(a == 2 * b for a, b in zip(sides, sides[1:]))     # every halving exact
        assert (4 <= sides[-1] <= 8) if size < 64 else (8 <= sides[-1] <= 16), (size, sides)
        assert cfg.attention_resolutions and all(8 <= r <= 16 for r in cfg.attention_resolutions)
        assert all(cfg.base_channels * m % cfg.groups == 0 for m in cfg.channel_mult)
    # the presets' spirit: DDPM's CIFAR-10 depth at 32, MNIST's 28 -> 14 -> 7, ADM's (1, 2, 3, 4) at 64
    assert derive_unet_config(32, 3).channel_mult == (1, 2, 2, 2)
    assert derive_unet_config(28, 1).channel_mult == (1, 2, 2)
    assert derive_unet_config(64, 3).channel_mult == (1, 2, 3, 4)
    assert derive_unet_config(8, 1).channel_mult == (1, 2)


@pytest.mark.parametrize("size", [8, 10, 12, 14, 20, 28, 32, 40, 56, 64, 72, 96, 128, 256])
def test_derived_unet_keeps_the_shape(size):
    cfg = derive_unet_config(size, 3, num_classes=2, base_channels=8)  # narrow: a CPU forward at every size
    model = UNet(cfg).eval()
    _perturb(model, seed=size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x, torch.tensor([10.0]), class_labels=torch.tensor([1]))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_derive_errors_and_overrides_and_description():
    for bad, near in ((7, "use 8,"), (9, "use 8 or 10"), (30, "use 28 or 32"), (300, "use 256,"), (200, "192 or 208")):
        with pytest.raises(ConfigError, match=f"image_size={bad} has no derived UNet layout.*{near}"):
            derive_unet_config(bad, 3)
    cfg = derive_unet_config(16, 4, text_conditioning="both", context_dim=D, base_channels=24, num_res_blocks=2)
    assert (cfg.base_channels, cfg.num_res_blocks, cfg.groups, cfg.cross_attention_resolutions) == (24, 2, 6, (16, 8))
    table = describe_layout(cfg)
    lines = table.splitlines()
    assert len(lines) <= 12 and "16x16" in table and "self + cross (text)" in table
    n_params = UNet(cfg).num_parameters()
    assert f"{n_params / 1e6:.2f}M parameters" in lines[0]
