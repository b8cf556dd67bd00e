"""Every export reads back: `Pipeline.load` (and `open`) on a diffusers folder or a diffusekit export delegates
to `from_diffusers`, and the folder samples what the exported pipeline sampled (same seed)."""
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
