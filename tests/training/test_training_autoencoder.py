"""Training the KL autoencoder end to end on tiny models: files, scaling factor, loading, resume, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusekit import store as ckpt
from diffusekit.store.autoencoder import (AutoencoderRunConfig, AutoencoderTrainConfig, autoencoder_fingerprint,
                                          cpu_autoencoder_config, load_autoencoder)
from diffusekit.training.reconstruction import reconstruction_psnr, save_reconstruction_grid
from diffusekit.training.autoencoder import train_autoencoder
from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, load_dataset, to_pixels
from diffusekit.nn.autoencoder import DiffusersAutoencoder, KLAutoencoder


def tiny(**train_kw) -> AutoencoderRunConfig:
    """An autoencoder with a handful of channels (factor 4: 16x16 -> 4x4) on 96 shapes resized to 16x16."""
    kw = dict(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.9, log_every=10, save_every=20,
              device="cpu", num_grid_images=10)
    return AutoencoderRunConfig(autoencoder=cpu_autoencoder_config(base_channels=8, groups=4),
                                data=DataConfig(source="shapes", limit=96, image_size=16),
                                train=AutoencoderTrainConfig(**{**kw, **train_kw}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    return train_autoencoder(tiny(), out, progress=False), out


def test_training_lowers_loss_and_writes_the_folder(trained):
    result, out = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "heldout_psnr" in r]
    assert [r["step"] for r in losses] == [10, 20, 30, 40] and [r["step"] for r in evals] == [20, 40]
    assert losses[-1]["loss"] < 0.6 * losses[0]["loss"]
    assert evals[-1]["heldout_psnr"] == result.psnr > evals[0]["heldout_psnr"]
    for name in ("config.json", "model.safetensors", "model_raw.safetensors", "trainer_state.pt",
                 "reconstructions.png", "loss.png"):
        assert (out / name).is_file(), name
    assert result.step == 40 and result.start_step == 0 and "seeded random 10%" in result.heldout

    # the scale is in config.json, in the weights' metadata and on the returned EMA model, all equal
    saved = json.loads((out / "config.json").read_text())
    _, meta = ckpt.read_weights(out / ckpt.EMA_FILE)
    assert saved["autoencoder"]["scaling_factor"] == float(meta["scaling_factor"]) == result.scaling_factor
    assert json.loads(meta["autoencoder_config"])["scaling_factor"] == result.scaling_factor
    assert result.ema_model.scaling_factor == result.scaling_factor != 1.0
    assert evals[-1]["scaling_factor"] == result.scaling_factor

    # the scaled latents of the data have about unit standard deviation (9 in 10 were the ones measured)
    ae = load_autoencoder(out)
    images = load_dataset(tiny().data).images
    with torch.no_grad():
        assert ae.encode(images).std().item() == pytest.approx(1.0, rel=0.1)
        assert (ae.posterior(images).mode() * result.scaling_factor).std().item() == pytest.approx(1.0, rel=0.1)

    # reconstructions.png: rows of originals over rows of reconstructions (10 images: 8 + 2 per pair of rows)
    grid = np.asarray(Image.open(out / "reconstructions.png"))
    cell = 4 * 16 + 2                     # 16 px upscaled 4x (make_grid's default), 2 px padding
    assert grid.shape[:2] == (4 * cell + 2, 8 * cell + 2)


def test_load_round_trip_frozen_and_fingerprint(trained, tmp_path):
    result, out = trained
    ae = load_autoencoder(out)
    assert isinstance(ae, KLAutoencoder) and not ae.training
    assert all(not p.requires_grad for p in ae.parameters())
    assert ae.latent_shape((3, 32, 32)) == (4, 8, 8) and ae.scaling_factor == result.scaling_factor
    x = load_dataset(DataConfig(source="shapes", limit=6, split="test", image_size=16)).images
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(z, result.ema_model.encode(x))
        assert torch.equal(ae.decode(z), result.ema_model.decode(z))
    assert reconstruction_psnr(ae, x) == reconstruction_psnr(result.ema_model, x)

    fp = autoencoder_fingerprint(out)
    assert len(fp) == 16 and fp == autoencoder_fingerprint(out)
    # a copy with other weights (the raw ones in place of the EMA) has another fingerprint
    import shutil
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns(".lock"))
    raw, meta = ckpt.read_weights(other / ckpt.RAW_FILE)
    ckpt.write_weights_atomic(other / ckpt.EMA_FILE, raw, meta)
    assert autoencoder_fingerprint(other) != fp


def test_resume_finished_run_writes_nothing_and_refusals(trained):
    result, out = trained
    def stamps():    # every file but the writer's lock, which the call takes
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ckpt.LOCK_FILE}
    before = stamps()
    again = train_autoencoder(tiny(), out, resume=True, progress=False)
    assert again.start_step == again.step == 40 and again.scaling_factor == result.scaling_factor
    assert again.psnr == result.psnr
    assert stamps() == before
    with pytest.raises(ckpt.CheckpointError, match="already holds a checkpoint at step 40; pass resume=True"):
        train_autoencoder(tiny(), out, progress=False)
    with pytest.raises(ConfigError, match=r"train.lr: checkpoint has 0.003, now 0.001"):
        train_autoencoder(tiny(lr=1e-3), out, resume=True, progress=False)


class _Stopped(Exception):
    """Stands for a process that died right after a save."""


def test_stop_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    """Stop a run after its first checkpoint, resume it, compare with a straight run bit for bit."""
    cfg = tiny(steps=30, save_every=10, log_every=5, num_grid_images=2, eval_images=4)
    real_save = ckpt.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Stopped
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    stopped = tmp_path / "stopped"
    with pytest.raises(_Stopped):
        train_autoencoder(cfg, stopped, progress=False)
    monkeypatch.undo()
    stopped_at = ckpt.read_trainer_state(stopped)["step"]
    assert stopped_at == 10
    with pytest.raises(ckpt.CheckpointError, match="unfinished autoencoder run \\(saved at step 10 of 30"):
        load_autoencoder(stopped)

    # fewer saves from here: save_every may change on resume and does not touch the optimisation
    fast = AutoencoderRunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "save_every": 100}})
    resumed = train_autoencoder(fast, stopped, resume=True, progress=False)
    straight = train_autoencoder(fast, tmp_path / "straight", progress=False)
    assert resumed.start_step == 10 and straight.start_step == 0      # it did resume, not restart
    assert resumed.step == straight.step == 30
    for name in (ckpt.EMA_FILE, ckpt.RAW_FILE):
        a, b = load_file(stopped / name), load_file(tmp_path / "straight" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = ckpt.read_trainer_state(stopped), ckpt.read_trainer_state(tmp_path / "straight")
    assert sa["ema_num_updates"] == sb["ema_num_updates"] == 30
    for i, s in sa["optimizer"]["state"].items():
        assert all(torch.equal(s[k], sb["optimizer"]["state"][i][k]) for k in s)
    assert resumed.scaling_factor == straight.scaling_factor and resumed.psnr == straight.psnr

    def losses(folder):
        return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert losses(stopped) == losses(tmp_path / "straight")
    assert [s for s, _ in losses(stopped)] == list(range(5, 31, 5))


def test_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)  # test-only: parameter init of the random diffusers model
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3,
                                  block_out_channels=(8, 16, 16), layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    ae = load_autoencoder(tmp_path / "vae")
    assert isinstance(ae, DiffusersAutoencoder) and not ae.training
    assert all(not p.requires_grad for p in ae.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x), vae.encode(x).latent_dist.mode() * 0.5)
    assert ae.latent_shape((3, 32, 32)) == (4, 8, 8)

    fp = autoencoder_fingerprint(tmp_path / "vae")
    assert fp == autoencoder_fingerprint(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.25}))
    assert autoencoder_fingerprint(tmp_path / "vae") != fp
    # a pipeline folder: point at its vae/
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="diffusers pipeline folder; give its autoencoder, the vae/ sub-folder"):
        load_autoencoder(tmp_path)


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder written by train_autoencoder"):
        load_autoencoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds neither model.safetensors .* it holds nothing"):
        load_autoencoder(tmp_path / "empty")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; give the folder that holds it"):
        autoencoder_fingerprint(tmp_path / "file.safetensors")

    # a diffusion run folder (its config.json has model/schedule sections) passed as an autoencoder
    from diffusekit.nn.unet import UNet, UNetConfig
    from diffusekit.store.run_config import RunConfig
    run = RunConfig(model=UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,),
                                     attention_resolutions=(), groups=4))
    unet = UNet(run.model).state_dict()
    ckpt.save_checkpoint(tmp_path / "diffusion", 1, ema=unet, raw=unet, trainer_state={},
                         config_json=run.to_json())
    with pytest.raises(ConfigError, match="is a diffusion run .* not an autoencoder folder"):
        load_autoencoder(tmp_path / "diffusion")


def test_config_and_data_checks(tmp_path):
    with pytest.raises(ConfigError, match="data.image_size=30 is not divisible by the autoencoder's downsampling "
                                          "factor 4"):
        AutoencoderRunConfig(data=DataConfig(source="shapes", image_size=30))
    with pytest.raises(ConfigError, match="the data has 3 channel\\(s\\) but autoencoder.in_channels=1"):
        train_autoencoder(AutoencoderRunConfig(autoencoder=cpu_autoencoder_config(1, base_channels=8, groups=4),
                                               data=DataConfig(source="shapes", limit=20)), tmp_path / "a",
                          progress=False)
    with pytest.raises(ConfigError, match="fewer than batch_size=32; set batch_size to at most 18"):
        train_autoencoder(AutoencoderRunConfig(autoencoder=cpu_autoencoder_config(base_channels=8, groups=4),
                                               data=DataConfig(source="shapes", limit=20),
                                               train=AutoencoderTrainConfig(batch_size=32, device="cpu")),
                          tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="heldout_fraction"):
        AutoencoderTrainConfig(heldout_fraction=1.0)


def test_reconstruction_grid_rows(tmp_path):
    originals = torch.rand(3, 3, 8, 8) * 2 - 1
    rec = -originals
    save_reconstruction_grid(originals, rec, tmp_path / "g.png", per_row=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    cell, pad = 8 * 8, 2                               # 8 px images are upscaled 8x
    def at(row, col):
        y, x = pad + row * (cell + pad), pad + col * (cell + pad)
        return grid[y:y + cell:8, x:x + cell:8]
    assert np.array_equal(at(0, 0), to_pixels(originals[0])) and np.array_equal(at(1, 1), to_pixels(rec[1]))
    assert np.array_equal(at(2, 0), to_pixels(originals[2])) and np.array_equal(at(3, 0), to_pixels(rec[2]))
    assert np.all(at(3, 1) == 0)                      # the short last pair is filled with black
