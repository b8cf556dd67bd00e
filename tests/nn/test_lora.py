"""LoRA adapters through peft on our UNet and on runs: targets, lora_scale, merge, save/load with the base check.

peft initialises lora_B to zero (a fresh adapter is the base exactly), so every test that compares
outputs first draws random adapter weights and shows the adapter changes the output.
"""
import json
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="LoRA adapters need peft (pip install -e '.[finetune]' from a clone)")

import diffusekit as dk  # noqa: E402
from diffusekit import store as ckpt  # noqa: E402
from diffusekit.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_record, add_adapter,  # noqa: E402
                                 read_adapter, save_adapter, write_merged)
from diffusekit.nn.lora import lora_state_dict  # noqa: E402
from diffusekit.config import ConfigError  # noqa: E402
from diffusekit.nn.attention import Attention, AttentionBlock  # noqa: E402
from diffusekit.nn.lora import (AdapterConfig, add_lora, get_lora_scale, has_lora, lora_targets,  # noqa: E402
                                merge_lora, set_lora_scale)
from diffusekit.nn.unet import UNet, UNetConfig  # noqa: E402
from diffusekit.store.run_config import RunConfig  # noqa: E402

TINY = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), num_heads=2, groups=4)


def _random_unet(seed=0, **overrides) -> UNet:
    """A tiny UNet with every weight random (a fresh UNet outputs exactly 0: its last conv starts at zero)."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    return unet


def _randomise_adapter(model: nn.Module, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _inputs(batch=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.tensor([5.0, 400.0, 999.0][:batch])


def test_default_targets_are_the_attention_projections_and_bad_targets_name_what_exists():
    unet = _random_unet()
    expected = [f"{n}.{c}" for n, m in unet.named_modules() if isinstance(m, (Attention, AttentionBlock))
                for c, sub in m.named_children() if isinstance(sub, nn.Linear)]
    # qkv and proj in each of the 4 attention blocks
    assert sorted(lora_targets(unet, AdapterConfig())) == sorted(expected) and len(expected) == 8
    convs = lora_targets(unet, AdapterConfig(targets=("conv",)))
    assert convs and all(isinstance(unet.get_submodule(n), nn.Conv2d) for n in convs)
    assert "out_conv" not in convs and "encoder.input_conv" not in convs     # the image-facing convs: by name only
    assert lora_targets(unet, AdapterConfig(targets=("out_conv",), rank=1)) == ["out_conv"]
    with pytest.raises(ConfigError, match=r"rank=32 is larger than encoder.down.2.1.qkv's smallest dimension \(16: "
                                          r"Linear 16 -> 48\); use rank <= 16"):
        lora_targets(unet, AdapterConfig(rank=32))
    with pytest.raises(ConfigError, match=r"'qkvv' matches no layer .*did you mean 'qkv'.*Linear: .*qkv, proj.*"
                                          r"Conv2d: input_conv, conv1, conv2"):
        lora_targets(unet, AdapterConfig(targets=("qkvv",)))
    with pytest.raises(ConfigError, match="has no text encoder among its modules"):
        lora_targets(unet, AdapterConfig(targets=("text",)))
    with pytest.raises(ConfigError, match="rank=0 is out of range"):
        AdapterConfig(rank=0)


def test_lora_scale_zero_is_the_base_bit_for_bit_and_scales_interpolate_like_merged_models():
    x, t = _inputs()
    unet = _random_unet()
    with torch.no_grad():
        base = unet(x, t)
        add_lora(unet, AdapterConfig(rank=4, alpha=8.0))
        assert torch.equal(unet(x, t), base)                      # B = 0: a fresh adapter is the base
        _randomise_adapter(unet)
        tuned = unet(x, t)
        assert (tuned - base).abs().max() > 1e-2                  # the adapter changes the output
        set_lora_scale(unet, 0.0)
        assert get_lora_scale(unet) == 0.0 and torch.equal(unet(x, t), base)
        set_lora_scale(unet, 0.5)
        half = unet(x, t)
        assert get_lora_scale(unet) == pytest.approx(0.5) and (half - base).abs().max() > 1e-3
        assert (half - tuned).abs().max() > 1e-3
        # each adapted layer interpolates exactly: W x + s (alpha / r) B A x
        layer = unet.encoder.middle[1].qkv
        h = torch.randn(2, 5, layer.in_features)
        update = layer.lora_B["default"](layer.lora_A["default"](h)) * 8.0 / 4
        torch.testing.assert_close(layer(h), layer.get_base_layer()(h) + 0.5 * update, rtol=0, atol=1e-6)
        # the model at scale s is the base with s * (alpha / r) B A folded in
        merged = merge_lora(_copy_with_adapter(unet), scale=0.5)
        torch.testing.assert_close(merged(x, t), half, rtol=0, atol=1e-5)


def _copy_with_adapter(model):
    import copy
    return copy.deepcopy(model)


@pytest.mark.parametrize("targets", [("attention",), ("attention", "conv"), ("emb_proj", "to_q")])
def test_merge_equals_the_adapter_model_at_scale_one(targets):
    """Folding B A into W gives the adapter model's outputs; the merged model has the base's parameter names.
    emb_proj: the UNet's batched projections read raw weights, so adapting them turns batching off."""
    overrides = dict(text_conditioning="cross_attention", context_dim=6) if "to_q" in targets else {}
    unet = _random_unet(**overrides)
    names = sorted(unet.state_dict())
    cond = {"encoder_hidden_states": torch.randn(3, 4, 6)} if overrides else {}
    x, t = _inputs()
    with torch.no_grad():
        base = unet(x, t, **cond)
        add_lora(unet, AdapterConfig(rank=2, alpha=3.0, targets=targets))
        _randomise_adapter(unet)
        tuned = unet(x, t, **cond)
        assert (tuned - base).abs().max() > 1e-2
        merged = merge_lora(unet)
        assert not has_lora(merged) and sorted(merged.state_dict()) == names
        torch.testing.assert_close(merged(x, t, **cond), tuned, rtol=0, atol=1e-5)


# --- adapters on runs: save, load, base checks, merge ------------------------------------------

@pytest.fixture()
def run(tmp_path):
    cfg = RunConfig(model=UNetConfig(**TINY))
    state = _random_unet(3).state_dict()
    ckpt.save_checkpoint(tmp_path / "base", 1, ema=state, raw=state, trainer_state={}, config_json=cfg.to_json())
    return tmp_path / "base"


def _sample(pipe, **kw):
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return pipe.sample(2, sampler="ddim", num_steps=4, noise=noise, **kw)


def _adapted(run, tmp_path, **config):
    pipe = dk.Pipeline.load(run, device="cpu", precision="fp32")
    add_adapter(pipe, AdapterConfig(**config))
    _randomise_adapter(pipe.model)
    return pipe, save_adapter(pipe, tmp_path / "adapter")


def test_save_load_round_trip_with_scale_and_size(run, tmp_path):
    base_images = _sample(dk.Pipeline.load(run, device="cpu", precision="fp32"))
    pipe, size = _adapted(run, tmp_path, rank=2, alpha=4.0)
    ours = _sample(pipe)
    assert (ours - base_images).abs().max() > 1e-3
    record, weights = read_adapter(tmp_path / "adapter")
    assert all(".lora_A." in k or ".lora_B." in k for k in weights) and len(weights) == 2 * len(record["targets"])
    n_adapter = sum(v.numel() for v in weights.values())
    assert size["adapter_parameters"] == n_adapter == record["size"]["adapter_parameters"]
    assert size["base_parameters"] == sum(p.numel() for p in UNet(UNetConfig(**TINY)).parameters())
    assert 0 < size["fraction"] < 0.05
    for loaded in (dk.Pipeline.load_adapter(tmp_path / "adapter", device="cpu", precision="fp32"),
                   dk.Pipeline.load(tmp_path / "adapter", device="cpu", precision="fp32")):
        assert loaded.lora_scale == 1.0 and loaded.adapter.targets == pipe.adapter.targets
        torch.testing.assert_close(_sample(loaded), ours, rtol=0, atol=0)
        assert torch.equal(_sample(loaded, lora_scale=0.0), base_images)        # 0 = the base, bit for bit
        assert loaded.lora_scale == 1.0                                         # the call's scale is undone
    loaded.lora_scale = 0.5
    halfway = _sample(loaded)
    assert (halfway - ours).abs().max() > 1e-4 and (halfway - base_images).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="lora_scale was given but this model has no LoRA adapter"):
        _sample(dk.Pipeline.load(run, device="cpu", precision="fp32"), lora_scale=0.5)


def test_a_moved_or_changed_base_is_refused_and_base_points_at_it_again(run, tmp_path):
    pipe, _ = _adapted(run, tmp_path)
    ours = _sample(pipe)
    moved = tmp_path / "elsewhere" / "base"
    moved.parent.mkdir()
    shutil.move(run, moved)
    with pytest.raises(ConfigError, match=r"was trained on .*base, which is not there any more .* pass base=NEW_PATH"):
        dk.Pipeline.load_adapter(tmp_path / "adapter", device="cpu", precision="fp32")
    torch.testing.assert_close(_sample(dk.Pipeline.load_adapter(tmp_path / "adapter", base=moved, device="cpu", precision="fp32")),
                               ours, rtol=0, atol=0)
    # a changed base: one weight nudged, the config unchanged
    state, meta = ckpt.read_weights(moved / ckpt.EMA_FILE)
    state["out_conv.bias"] = state["out_conv.bias"] + 1e-3
    ckpt.write_weights_atomic(moved / ckpt.EMA_FILE, state, meta)
    with pytest.raises(ConfigError, match=r"base .* has changed since the adapter .* was trained: its weights hash "
                                          r"[0-9a-f]{12}, the adapter expects [0-9a-f]{12}; pass base="):
        dk.Pipeline.load_adapter(tmp_path / "adapter", base=moved, device="cpu", precision="fp32")


def test_a_tree_moved_whole_finds_its_base_by_the_relative_path(run, tmp_path):
    _adapted(run, tmp_path)
    json_path = tmp_path / "adapter" / ADAPTER_CONFIG
    record = json.loads(json_path.read_text())
    assert record["base"]["relative_path"] == "../base" and (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    shutil.copytree(tmp_path, tmp_path.parent / (tmp_path.name + "-copy"))
    shutil.rmtree(run)                                  # the recorded absolute path is gone
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    assert dk.Pipeline.load_adapter(copy / "adapter", device="cpu", precision="fp32").adapter.base["path"] == str(copy / "base")


def test_write_merged_gives_a_plain_run_equal_to_the_adapter_at_its_scale(run, tmp_path):
    pipe, _ = _adapted(run, tmp_path, rank=2, targets=("attention", "conv"))
    ours = _sample(pipe)
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        write_merged(pipe, run)
    write_merged(pipe, tmp_path / "merged")
    assert pipe.adapter is None and not has_lora(pipe.model)
    merged = dk.Pipeline.load(tmp_path / "merged", device="cpu", precision="fp32")
    assert merged.lora_scale is None and not (tmp_path / "merged" / ckpt.STATE_FILE).exists()
    torch.testing.assert_close(_sample(merged), ours, rtol=0, atol=1e-5)
    # at scale 0.5: the merged run samples what the adapter did at 0.5
    pipe2 = dk.Pipeline.load_adapter(tmp_path / "adapter", device="cpu", precision="fp32")
    pipe2.lora_scale = 0.5
    half = _sample(pipe2)
    write_merged(pipe2, tmp_path / "merged-half")
    torch.testing.assert_close(_sample(dk.Pipeline.load(tmp_path / "merged-half", device="cpu", precision="fp32")), half,
                               rtol=0, atol=1e-5)
    assert (half - ours).abs().max() > 1e-4


def test_a_trainer_run_layout_adapter_weights_through_the_checkpoint_journal(run, tmp_path):
    """What the fine-tune trainer writes: EMA / raw adapter weights by save_checkpoint, adapter.json naming
    model.safetensors; Pipeline.load(run) samples the EMA adapter. save_adapter(state_dict=) writes given weights."""
    pipe, _ = _adapted(run, tmp_path)
    raw = lora_state_dict(pipe.model)
    ema = {k: v * 0.5 if ".lora_B." in k else v for k, v in raw.items()}       # B A halved: scale 0.5
    ft = tmp_path / "ft"
    ckpt.save_checkpoint(ft, 7, ema=ema, raw=raw, trainer_state={})
    (ft / ADAPTER_CONFIG).write_text(json.dumps(adapter_record(pipe, ft, weights_file=ckpt.EMA_FILE)))
    loaded = dk.Pipeline.load(ft, device="cpu", precision="fp32")
    pipe.lora_scale = 0.5
    torch.testing.assert_close(_sample(loaded), _sample(pipe), rtol=0, atol=1e-6)
    assert (_sample(loaded) - _sample(pipe, lora_scale=1.0)).abs().max() > 1e-4
    save_adapter(pipe, tmp_path / "ema", state_dict=ema)
    torch.testing.assert_close(_sample(dk.Pipeline.load(tmp_path / "ema", device="cpu", precision="fp32")), _sample(pipe),
                               rtol=0, atol=1e-6)
    record = json.loads((ft / ADAPTER_CONFIG).read_text())
    (ft / ADAPTER_CONFIG).write_text(json.dumps({**record, "weights_file": "../base/model.safetensors"}))
    with pytest.raises(ConfigError, match="must be a file name in the adapter folder"):
        dk.Pipeline.load(ft, device="cpu", precision="fp32")
