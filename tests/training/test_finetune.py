"""Fine-tuning (training/finetune.py): LoRA and full fine-tunes of tiny runs, DreamBooth class images, exact
resume, the refusals, and the CLI from finetune to merge.

Bases are tiny runs with random weights (a fresh UNet outputs exactly 0), saved through the journal; the
instance folders hold a few 8x8 PNGs. Each fine-tune takes a few steps at a large learning rate.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("peft", reason="LoRA adapters need peft (pip install -e '.[finetune]' from a clone)")

import diffusekit as dk  # noqa: E402
from diffusekit import store as ckpt  # noqa: E402
from diffusekit.cli import main  # noqa: E402
from diffusekit.config import ConfigError  # noqa: E402
from diffusekit.data import DataConfig, load_dataset  # noqa: E402
from diffusekit.nn.network import build_model  # noqa: E402
from diffusekit.nn.text import TextEncoderConfig, build_vocab  # noqa: E402
from diffusekit.nn.unet import UNetConfig  # noqa: E402
from diffusekit.schedule import NoiseSchedule  # noqa: E402
from diffusekit.store.autoencoder import load_autoencoder  # noqa: E402
from diffusekit.store.run_config import LatentConfig, RunConfig, weights_metadata  # noqa: E402
from diffusekit.training.autoencoder import autoencoder_run_config, train_autoencoder  # noqa: E402
from diffusekit.training import finetune_data  # noqa: E402
from diffusekit.training.finetune import finetune, finetune_config, plan_finetune  # noqa: E402
from diffusekit.training.losses import diffusion_loss  # noqa: E402

TINY = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), num_heads=2, groups=4)
FAST = {"train.lr": 1e-2, "train.precision": "fp32", "train.device": "cpu", "train.sample_every": 0,
        "train.save_every": 100, "train.sample_steps": 3}


def _save_base(folder, cfg: RunConfig, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    state = model.state_dict()
    ckpt.save_checkpoint(folder, 1, ema=state, raw=state, trainer_state={}, config_json=cfg.to_json(),
                         metadata=weights_metadata(cfg))
    return folder


@pytest.fixture()
def base(tmp_path):
    return _save_base(tmp_path / "base", RunConfig(model=UNetConfig(**TINY)))


@pytest.fixture()
def text_base(tmp_path):
    vocab = build_vocab(["a sks emoji", "an emoji", "a circle"])
    text = TextEncoderConfig(kind="learned", dim=8, layers=1, heads=2, max_length=8, vocab=tuple(vocab))
    cfg = RunConfig(model=UNetConfig(**TINY, text_conditioning="both", context_dim=8), text=text)
    return _save_base(tmp_path / "text-base", cfg)


def _images(folder, n=4):
    folder.mkdir()
    for i in range(n):
        a = np.zeros((8, 8), np.uint8)
        a[2:6, 1 + i:3 + i] = 255
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


@pytest.fixture()
def data(tmp_path):
    return _images(tmp_path / "data")


def _sample(pipe, **kw):
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return pipe.sample(3, sampler="ddim", num_steps=4, noise=noise, **kw)


def _run(base, data, out, steps=4, **options):
    return finetune(finetune_config(base, data, {**FAST, "train.steps": steps, **options}), out, progress=False)


def test_a_lora_finetune_changes_the_model_scale_zero_is_the_base_and_the_adapter_is_small(base, data, tmp_path):
    before = _sample(dk.Pipeline.load(base, device="cpu", precision="fp32"))
    result = _run(base, data, tmp_path / "ft", **{"adapter.rank": 2, "train.sample_every": 4})
    assert result.step == 4 and result.method == "lora"
    ft = tmp_path / "ft"
    assert (ft / "samples" / "step_000004.png").is_file() and (ft / "finetune.json").is_file()
    pipe = dk.Pipeline.load(ft, device="cpu", precision="fp32")
    assert pipe.adapter is not None and pipe.lora_scale == 1.0
    after = _sample(pipe)
    assert (after - before).abs().max() > 1e-3                      # the fine-tune moved the samples
    assert torch.equal(_sample(pipe, lora_scale=0.0), before)       # scale 0: the base, bit for bit
    adapter_bytes = (ft / ckpt.EMA_FILE).stat().st_size
    base_bytes = (base / ckpt.EMA_FILE).stat().st_size
    assert adapter_bytes < 0.05 * base_bytes
    weights, _ = ckpt.read_weights(ft / ckpt.EMA_FILE)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    record = json.loads((ft / "adapter.json").read_text())
    assert record["weights_file"] == ckpt.EMA_FILE and record["adapter"]["rank"] == 2


def test_a_full_finetune_writes_a_plain_loadable_run(base, data, tmp_path):
    _run(base, data, tmp_path / "full", method="full")
    pipe = dk.Pipeline.load(tmp_path / "full", device="cpu", precision="fp32")
    assert pipe.adapter is None and pipe.lora_scale is None
    assert pipe.config.model == dk.Pipeline.load(base, device="cpu", precision="fp32").config.model
    assert (_sample(pipe) - _sample(dk.Pipeline.load(base, device="cpu", precision="fp32"))).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="has no LoRA adapter"):
        _sample(pipe, lora_scale=0.5)


def test_a_full_finetune_of_a_latent_base_holds_its_autoencoder_and_loads(tmp_path):
    shapes = DataConfig(source="shapes", limit=16, image_size=16)
    data = load_dataset(shapes)
    ae_cfg = autoencoder_run_config(shapes, data, {"base_channels": 8, "groups": 4}, steps=2, batch_size=8,
                                    save_every=2, log_every=1, device="cpu", eval_images=8, scaling_images=16)
    train_autoencoder(ae_cfg, tmp_path / "ae", progress=False, dataset=data)
    c, h, _ = load_autoencoder(tmp_path / "ae").latent_shape((3, 16, 16))
    unet = UNetConfig(**{**TINY, "image_size": h, "in_channels": c})
    base = _save_base(tmp_path / "latent", RunConfig(model=unet, latent=LatentConfig(str(tmp_path / "ae"), 16, 3)))
    shutil.copytree(tmp_path / "ae", base / "autoencoder")          # as `train` keeps it
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    _run(base, folder, tmp_path / "full", steps=2, method="full", **{"train.batch_size": 2})
    assert (tmp_path / "full" / "autoencoder" / ckpt.EMA_FILE).is_file()
    pipe = dk.Pipeline.load(tmp_path / "full", device="cpu")
    noise = torch.randn(2, c, h, h, generator=torch.Generator().manual_seed(0))
    tuned = pipe.sample(2, "ddim", 3, noise=noise)
    assert tuned.shape == (2, 3, 16, 16)
    assert (tuned - dk.Pipeline.load(base, device="cpu").sample(2, "ddim", 3, noise=noise)).abs().max() > 1e-4


def test_resume_after_a_stop_equals_the_straight_run_bit_for_bit(base, data, tmp_path):
    _run(base, data, tmp_path / "straight", steps=4, **{"adapter.dropout": 0.1})
    _run(base, data, tmp_path / "resumed", steps=2, **{"adapter.dropout": 0.1})
    finetune(finetune_config(base, data, {**FAST, "train.steps": 4, "adapter.dropout": 0.1}), tmp_path / "resumed",
             resume=True, progress=False)
    for name in (ckpt.EMA_FILE, ckpt.RAW_FILE):
        a, _ = ckpt.read_weights(tmp_path / "straight" / name)
        b, _ = ckpt.read_weights(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ckpt.CheckpointError, match="already holds a checkpoint at step 4"):
        _run(base, data, tmp_path / "resumed")
    with pytest.raises(ConfigError, match=r"--resume keeps the fine-tune's settings, but adapter.rank: the run has 4, "
                                          r"the command line says 8"):
        plan_finetune(base, data, tmp_path / "resumed", {"adapter.rank": 8}, resume=True)
    assert plan_finetune(base, data, tmp_path / "resumed", {"train.steps": 4}, resume=True).finished


def test_prior_preservation_loss_is_instance_loss_plus_weight_times_class_loss():
    schedule = NoiseSchedule.from_config(RunConfig().schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([3, 200, 600, 999])

    def model(x, t):
        return x * 0.3 + t.float()[:, None, None, None] * 1e-3
    w = 0.7
    both = diffusion_loss(model, schedule, x0, "epsilon", None, t=t, noise=noise,
                          sample_weights=torch.tensor([2.0, 2.0, 2 * w, 2 * w]))
    inst = diffusion_loss(model, schedule, x0[:2], "epsilon", None, t=t[:2], noise=noise[:2])
    cls = diffusion_loss(model, schedule, x0[2:], "epsilon", None, t=t[2:], noise=noise[2:])
    torch.testing.assert_close(both, inst + w * cls, rtol=1e-6, atol=0)


def test_dreambooth_class_images_are_drawn_once_and_reused_on_resume(text_base, data, tmp_path):
    calls = []

    def counting(cfg, pipe):
        calls.append(cfg.num_class_images)
        return finetune_data.draw_class_images(cfg, pipe)
    options = {**FAST, "instance_prompt": "a sks emoji", "class_prompt": "an emoji", "num_class_images": 6,
               "prior_loss_weight": 0.5, "adapter.targets": ("attention", "text")}
    finetune(finetune_config(text_base, data, {**options, "train.steps": 2}), tmp_path / "db", progress=False,
             generate=counting)
    cached = ckpt.read_weights(tmp_path / "db" / "class_images" / "images.safetensors")[0]["images"]
    assert calls == [6] and cached.shape == (6, 1, 8, 8)
    made_by = json.loads((tmp_path / "db" / "class_images" / "images.json").read_text())
    assert made_by["class_prompt"] == "an emoji" and made_by["num_class_images"] == 6
    finetune(finetune_config(text_base, data, {**options, "train.steps": 4}), tmp_path / "db", resume=True,
             progress=False, generate=counting)
    assert calls == [6]                                             # reused, not drawn again
    pipe = dk.Pipeline.load(tmp_path / "db", device="cpu", precision="fp32")
    tuned = pipe.sample(2, "ddim", 3, generator=torch.Generator().manual_seed(0), prompt="a sks emoji")
    base = pipe.sample(2, "ddim", 3, generator=torch.Generator().manual_seed(0), prompt="a sks emoji", lora_scale=0)
    assert (tuned - base).abs().max() > 1e-4


def test_transparent_instance_images_take_the_background_the_base_was_trained_on(base, tmp_path):
    white_cfg = RunConfig(model=UNetConfig(**TINY), data=DataConfig(alpha_background="white"))
    white = _save_base(tmp_path / "white", white_cfg)
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i in range(2):
        a = np.zeros((8, 8, 4), np.uint8)
        a[..., 0] = 255                                       # red, fully transparent but for one pixel
        a[0, i, 3] = 255
        Image.fromarray(a, "RGBA").save(folder / f"{i}.png")
    for run, background in ((white, 1.0), (base, -1.0)):
        images, _ = finetune_data.instance_images(finetune_config(run, folder, {"train.batch_size": 2}),
                                                    dk.Pipeline.load(run, device="cpu"))
        assert images.shape == (2, 1, 8, 8)
        assert (images[:, 0, 1:] == background).all()         # transparent pixels: the base's background
        assert (images[:, 0, 0, :2] != background).any()      # the opaque pixels stay


def test_bad_inputs_are_refused_in_one_line(base, data, tmp_path):
    with pytest.raises(ConfigError, match="is neither a diffusekit run .* nor a diffusers folder"):
        plan_finetune(data, data, tmp_path / "x")
    one = _images(tmp_path / "one", n=1)
    with pytest.raises(ConfigError, match="holds 1 image; a fine-tune needs at least 2 images"):
        _run(base, one, tmp_path / "x1")
    with pytest.raises(ConfigError, match=r"rank=64 is larger than .* smallest dimension"):
        _run(base, data, tmp_path / "x2", **{"adapter.rank": 64})
    with pytest.raises(ConfigError, match="a class_prompt"):
        finetune_config(base, data, {"num_class_images": 3})
    # a base whose weights changed since the run began: its resume is refused
    _run(base, data, tmp_path / "ft", steps=2)
    state, meta = ckpt.read_weights(base / ckpt.EMA_FILE)
    state["out_conv.bias"] = state["out_conv.bias"] + 1e-3
    ckpt.write_weights_atomic(base / ckpt.EMA_FILE, state, meta)
    with pytest.raises(ConfigError, match=r"has changed since the adapter .* was trained"):
        finetune(finetune_config(base, data, {**FAST, "train.steps": 4}), tmp_path / "ft", resume=True, progress=False)


def test_cli_finetune_sample_merge_and_the_merged_run_equals_the_adapter(base, data, tmp_path):
    runner = CliRunner()
    ft, merged = tmp_path / "ft", tmp_path / "merged"
    r = runner.invoke(main, ["finetune", str(base), "--data", str(data), "--out", str(ft), "--train-steps", "3",
                             "--lr", "1e-2", "--lora-rank", "2", "--lora-targets", "attention,conv", "--precision",
                             "fp32", "--device", "cpu", "--sample-every", "0"])
    assert r.exit_code == 0, r.output
    assert "fine-tuned (lora) 3 steps" in r.output
    for name, run, extra in (("zero.png", ft, ["--lora-scale", "0"]), ("base.png", base, [])):
        r = runner.invoke(main, ["sample", str(run), "--n", "2", "--steps", "3", "--sampler", "ddim", "--seed", "1",
                                 "--device", "cpu", "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "zero.png").read_bytes() == (tmp_path / "base.png").read_bytes()
    r = runner.invoke(main, ["sample", str(base), "--lora-scale", "0.5", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "no LoRA adapter" in r.output
    r = runner.invoke(main, ["merge", str(ft), "--out", str(merged)])
    assert r.exit_code == 0, r.output
    adapter, plain = dk.Pipeline.load(ft, device="cpu", precision="fp32"), dk.Pipeline.load(merged, device="cpu", precision="fp32")
    assert plain.adapter is None
    torch.testing.assert_close(_sample(plain), _sample(adapter, lora_scale=1.0), rtol=0, atol=1e-5)
    r = runner.invoke(main, ["finetune", str(data), "--data", str(data), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "neither a diffusekit run" in r.output
    r = runner.invoke(main, ["finetune", str(base), "--data", str(data), "--out", str(tmp_path / "dry"), "--dry-run",
                             "--lora-targets", "to_q,conv", "--instance-prompt", "a sks digit"])
    assert r.exit_code == 0 and json.loads(r.output)["adapter"]["targets"] == ["to_q", "conv"]


@pytest.mark.slow
def test_lora_dreambooth_on_a_tiny_stable_diffusion_folder_trains_unet_and_text_and_exports(tmp_path):
    """The SD layout (UNet2DConditionModel, CLIP, AutoencoderKL; random, tiny): both adapters train (the frozen
    CLIP encodes with autograd once a LoRA is on it), the class images are latents' decodings, the export
    is diffusers' file."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from test_interop_t2i import _clip_tokenizer, _save
    from diffusekit.interop.lora import export_diffusers_lora
    sd = _save((diffusers, transformers), tmp_path / "sd", _clip_tokenizer(transformers, tmp_path / "tok"))
    size = dk.Pipeline.from_diffusers(sd, device="cpu", precision="fp32").image_shape[1]
    (tmp_path / "data").mkdir()
    for i in range(2):
        a = np.zeros((size, size, 3), np.uint8)
        a[:, 4 * i:4 * i + 6] = 200
        Image.fromarray(a).save(tmp_path / "data" / f"{i}.png")
    options = {**FAST, "train.lr": 1e-3, "train.steps": 2, "train.batch_size": 2, "instance_prompt": "a sks dog",
               "class_prompt": "a dog", "num_class_images": 2, "adapter.targets": ("attention", "text")}
    finetune(finetune_config(sd, tmp_path / "data", options), tmp_path / "ft", progress=False)
    raw, _ = ckpt.read_weights(tmp_path / "ft" / ckpt.RAW_FILE)
    for part in ("unet.", "text_encoder."):
        assert max(float(v.abs().max()) for k, v in raw.items() if k.startswith(part) and ".lora_B." in k) > 1e-4
    assert ckpt.read_weights(tmp_path / "ft" / "class_images" / "images.safetensors")[0]["images"].shape == \
        (2, 3, size, size)
    path = export_diffusers_lora(tmp_path / "ft", tmp_path / "exp")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "exp")             # diffusers reads what the fine-tune wrote
    assert path.is_file()
