"""Text-to-image end to end on the built-in captioned shapes: train, load, sample with prompts and guidance,
edit, and the errors a user can cause (the latent half is in tests/pipeline/test_pipeline_latent.py)."""
import json

import pytest
import torch
from click.testing import CliRunner

from diffusekit.cli import main
from diffusekit.config import ConfigError
from diffusekit.pipeline import Pipeline
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training import train

TINY = {"model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_res_blocks": 1, "model.groups": 4,
        "model.attention_resolutions": (8,), "model.num_heads": 2}


def text_options(**extra):
    return {"data.source": "shapes", "data.limit": 64, "data.image_size": 16, "text.kind": "learned",
            "text.dim": 16, "text.layers": 1, "text.heads": 2, **TINY, "train.steps": 12, "train.batch_size": 16,
            "train.warmup_steps": 2, "train.save_every": 12, "train.sample_every": 12, "train.num_sample_images": 4,
            "train.sample_steps": 3, "train.log_every": 4, "train.device": "cpu", **extra}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    cfg, data = resolve_run_config(text_options())
    out = tmp_path_factory.mktemp("t2i") / "shapes"
    result = train(cfg, out, dataset=data, progress=False)
    return out, result


def test_text_run_records_its_encoder_and_trains(text_run):
    out, result = text_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text"]["kind"] == "learned" and "circle" in cfg["text"]["vocab"]
    assert cfg["model"]["text_conditioning"] == "both" and cfg["model"]["num_classes"] == 0
    assert result.step == 12 and (out / "samples" / "step_000012.png").exists()
    # the learned encoder trains with the UNet and is saved with it
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


def test_prompts_condition_the_samples(text_run):
    out, _ = text_run
    pipe = Pipeline.load(out, device="cpu")
    assert pipe.has_text and pipe.image_shape == (3, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)            # noqa: E731
    red = pipe.sample(2, "ddim", 4, generator=g(), prompt="a large red circle on the left")
    blue = pipe.sample(2, "ddim", 4, generator=g(), prompt="a small blue square at the top")
    assert red.shape == (2, 3, 16, 16) and not torch.equal(red, blue)
    again = pipe.sample(2, "ddim", 4, generator=g(), prompt="a large red circle on the left")
    assert torch.equal(red, again)
    guided = pipe.sample(2, "ddim", 4, generator=g(), prompt="a large red circle on the left", guidance_scale=3.0,
                         negative_prompt="a small blue square at the top")
    assert torch.isfinite(guided).all() and not torch.equal(guided, red)
    edited = pipe.edit(red[:1], 0.5, "ddim", 4, g(), prompt="a small blue square at the top")
    assert edited.shape == (1, 3, 16, 16)


def test_prompt_errors_name_the_fix(text_run, tmp_path):
    out, _ = text_run
    pipe = Pipeline.load(out, device="cpu")
    with pytest.raises(ConfigError, match="never occur in this run's captions"):
        pipe.sample(1, "ddim", 2, prompt="a purple elephant")
    with pytest.raises(ConfigError, match="2 prompts for 3 images"):
        pipe.sample(3, "ddim", 2, prompt=["a", "b"])
    with pytest.raises(ConfigError, match="text conditioning needs captions"):
        resolve_run_config({"data.source": "digits", "text.kind": "learned"})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle on the left\na small green triangle at the bottom\n")
    r = CliRunner().invoke(main, ["sample", str(out), "--prompts-file", str(prompts), "--n", "2", "--steps", "3",
                                  "--sampler", "ddim", "--guidance", "2", "--out", str(tmp_path / "grid.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "grid.png").exists()


def test_class_runs_refuse_prompts(tmp_path):
    cfg, data = resolve_run_config({"data.source": "digits", "train.steps": 1, "train.batch_size": 8,
                                    "train.sample_every": 0, "train.device": "cpu", **TINY,
                                    "model.attention_resolutions": ()})
    train(cfg, tmp_path / "r", dataset=data, progress=False)
    with pytest.raises(ConfigError, match="not text-conditioned"):
        Pipeline.load(tmp_path / "r", device="cpu").sample(1, prompt="a digit")
