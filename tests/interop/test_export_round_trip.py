"""Every export reads back: `Pipeline.load` (and `open`) on a diffusers folder or a diffusekit export delegates
to `from_diffusers`, and the folder samples what the exported pipeline sampled (same seed)."""
import pytest
import torch

import diffusekit as dk
from diffusekit.interop import export_diffusers
from diffusekit.nn.unet import UNet, UNetConfig


def _pipe(**overrides) -> dk.Pipeline:
    cfg = UNetConfig(**{**dict(image_size=8, in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(), num_heads=1, groups=4), **overrides})
    model = UNet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # a fresh UNet outputs exactly 0 (zero-initialised branches): randomise it
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    n = overrides.get("num_classes", 0)
    return dk.Pipeline(model.eval(), dk.NoiseSchedule.create("cosine"), image_shape=(3, 8, 8), num_classes=n,
                       class_names=[f"c{i}" for i in range(n)], device="cpu")


def _samples(pipe, **kwargs):
    return pipe.sample(2, sampler="ddim", num_steps=4, timestep_spacing="trailing",
                       generator=torch.Generator().manual_seed(5), **kwargs)


def test_load_takes_a_diffusers_folder(tmp_path):
    pipe = _pipe()
    export_diffusers(pipe, tmp_path / "out")
    ours = _samples(pipe)
    for opener in (dk.Pipeline.load, dk.Pipeline.open, dk.Pipeline.from_diffusers):
        again = opener(tmp_path / "out", device="cpu")
        assert again.scheduler_config is not None           # read as a diffusers folder, not as a run
        torch.testing.assert_close(_samples(again), ours, rtol=0, atol=1e-5)


def _train_tiny(out, num_classes: int):
    from diffusekit.data import DataConfig
    from diffusekit.schedule import ScheduleConfig
    from diffusekit.store.run_config import RunConfig, TrainConfig
    from diffusekit.training import train
    model = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), num_heads=2, groups=4, num_classes=num_classes)
    cfg = RunConfig(model=model, schedule=ScheduleConfig(num_train_timesteps=100),
                    data=DataConfig(class_labels=num_classes > 0),
                    train=TrainConfig(steps=4, batch_size=8, lr=2e-3, warmup_steps=1, log_every=2, save_every=4,
                                      sample_every=0, device="cpu", precision="fp32"))
    train(cfg, out, progress=False)
    return out


def test_every_exported_run_loads_back_and_samples_the_same(tmp_path):
    """An unconditional run (a UNet2DModel that diffusers loads) and a class-conditional one (our weights in
    diffusekit_unet/, with the one-line note the CLI prints): each export, read by Pipeline.load, samples the
    run's images with the same seed (the EMA weights that load_run chooses are the ones exported)."""
    from click.testing import CliRunner
    from diffusekit.cli import main
    for num_classes, loadable in ((0, True), (10, False)):
        run = _train_tiny(tmp_path / f"run{num_classes}", num_classes)
        out = tmp_path / f"export{num_classes}"
        r = CliRunner().invoke(main, ["export", str(run), str(out), "--format", "diffusers"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert (out / "model_index.json").exists() == loadable
        if not loadable:
            line = r.output.strip()
            assert "\n" not in line and "class-conditional" in line and "no diffusers equivalent" in line
            assert "Pipeline.load(" in line and "Pipeline.load(\"THIS_FOLDER\")" in (out / "README.md").read_text()
        kwargs = dict(class_labels=[1, 7]) if num_classes else {}
        torch.testing.assert_close(_samples(dk.Pipeline.load(out, device="cpu", precision="fp32"), **kwargs),
                                   _samples(dk.Pipeline.load(run, device="cpu", precision="fp32"), **kwargs), rtol=0, atol=1e-5)


def test_runs_whose_export_would_not_read_back_are_refused(tmp_path):
    class TextModel(torch.nn.Module):           # what Pipeline.has_text looks for
        def encode_text(self, prompts):
            raise AssertionError("not called")

        def forward(self, x, t, **cond):
            return x
    text = dk.Pipeline(TextModel(), dk.NoiseSchedule.create("cosine"), image_shape=(3, 8, 8), device="cpu")
    latent = dk.Pipeline(_pipe().model, dk.NoiseSchedule.create("cosine"), image_shape=(3, 16, 16),
                         latent_shape=(3, 8, 8), autoencoder=torch.nn.Identity(), device="cpu")
    for pipe, message in ((text, "text-to-image runs are not exported yet"), (latent, "latent runs")):
        with pytest.raises(dk.ConfigError, match=rf"{message}.*Pipeline.load\(RUN\)"):
            export_diffusers(pipe, tmp_path / "out")
        assert not (tmp_path / "out").exists()
