"""The CLI takes a diffusers folder's scheduler as its default sampler, and the data options of a captioned
colour folder (--background, --caption-column, --caption-template) reach the run config."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import diffusekit as dk
from diffusekit.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def ddim_folder(tmp_path_factory):
    """diffusers' defaults: DDIMScheduler() has clip_sample=True and leading spacing."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    path = tmp_path_factory.mktemp("ddim") / "pipe"
    diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(path)
    return path


def _grid(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_defaults_to_the_folders_scheduler(ddim_folder, tmp_path):
    r = run("sample", ddim_folder, "--steps", 10, "--n", 4, "--nrow", 4, "--seed", 0, "--device", "cpu",
            "--precision", "fp32", "--out", tmp_path / "cli.png")
    assert r.exit_code == 0, r.output
    assert "ddim with 10 steps" in r.output
    pipe = dk.Pipeline.from_diffusers(ddim_folder, device="cpu", precision="fp32")
    expected = pipe.sample(4, num_steps=10, generator=torch.Generator().manual_seed(0))
    dk.viz.save_grid(expected, tmp_path / "lib.png", nrow=4)
    np.testing.assert_array_equal(_grid(tmp_path / "cli.png"), _grid(tmp_path / "lib.png"))
    # the check can fail: the old default (dpmpp_2m, trailing, no clipping) draws another picture, with a note
    r = run("sample", ddim_folder, "--sampler", "dpmpp_2m", "--steps", 10, "--n", 4, "--nrow", 4, "--seed", 0,
            "--device", "cpu", "--precision", "fp32", "--out", tmp_path / "other.png")
    assert r.exit_code == 0, r.output
    assert "note:" in r.output or "not carr" in r.output or "does not" in r.output, r.output
    assert not np.array_equal(_grid(tmp_path / "other.png"), _grid(tmp_path / "lib.png"))


def _captioned_folder(root):
    root.mkdir()
    rows = []
    for i, (name, style) in enumerate([("cat face", "noto"), ("dog face", "twemoji"), ("cat face", "twemoji")]):
        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[2:6, 2:6] = (200, 30, 30, 255)                    # an opaque square on a transparent ground
        Image.fromarray(rgba, "RGBA").save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "name": name, "style": style})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_train_data_options_reach_the_run_config(tmp_path):
    data = _captioned_folder(tmp_path / "emoji")
    r = run("train", "--data", data, "--out", tmp_path / "run", "--text", "learned", "--background", "white",
            "--caption-column", "name", "--caption-template", "{name}, {style} style", "--dry-run")
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output[r.output.index("{"):])
    assert cfg["data"]["alpha_background"] == "white"
    assert cfg["data"]["caption_template"] == "{name}, {style} style"
    assert cfg["data"]["caption_column"] == "name"
    from diffusekit.data import DataConfig, load_dataset
    ds = load_dataset(DataConfig.from_dict(cfg["data"]))
    assert ds.captions == ["cat face, noto style", "dog face, twemoji style", "cat face, twemoji style"]
    assert torch.equal(ds.images[:, :, 0, 0], torch.ones(3, 3))          # the transparent corner is white


@pytest.mark.parametrize("value", ["red", "256,0,0", "1,2"])
def test_a_bad_background_is_one_line_with_the_forms(tmp_path, value):
    r = run("train", "--data", "digits", "--out", tmp_path / "run", "--background", value, "--dry-run")
    assert r.exit_code == 2
    assert "black" in r.output and "R,G,B" in r.output and "Traceback" not in r.output
