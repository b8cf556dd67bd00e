"""The one-liners a diffusers user expects from the package root: dk.save_grid, dk.to_pil, sample(output="pil")."""
import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit as dk


@pytest.mark.parametrize("c,mode", [(1, "L"), (3, "RGB")])
def test_to_pil_gives_one_image_per_sample_with_the_pixels_of_the_tensor(c, mode):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, c, 5, 7, generator=g) * 2.4 - 1.2                  # a little outside [-1, 1]
    pil = dk.to_pil(images)
    assert [p.mode for p in pil] == [mode] * 3 and pil[0].size == (7, 5)        # PIL: (width, height)
    # pixel = round((x + 1) / 2 * 255) of x clamped to [-1, 1], written out here independently
    expected = np.rint((images.clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8)
    got = np.stack([np.asarray(p).reshape(5, 7, c) for p in pil]).transpose(0, 3, 1, 2)
    assert np.array_equal(got, expected)
    assert np.array_equal(np.asarray(dk.to_pil(images[1])[0]), np.asarray(pil[1]))   # (C, H, W) alone


def test_to_pil_refuses_latents():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        dk.to_pil(torch.zeros(2, 4, 8, 8))


def test_save_grid_from_the_root(tmp_path):
    images = torch.linspace(-1, 1, 4 * 3 * 4 * 4).reshape(4, 3, 4, 4)
    path = dk.save_grid(images, tmp_path / "grid.png", nrow=2, padding=0, upscale=1)
    assert np.array_equal(np.asarray(Image.open(path)), dk.make_grid(images, nrow=2, padding=0, upscale=1))
    assert np.asarray(Image.open(path))[4:, :4].tolist() == np.asarray(dk.to_pil(images[2])[0]).tolist()
    assert {"save_grid", "to_pil", "Pipeline"} <= set(dk.__all__)


def _pipe(channels: int) -> dk.Pipeline:
    def model(x, t):                         # a fixed eps-predictor: every sampler step is deterministic
        return 0.3 * x
    return dk.Pipeline(model, dk.NoiseSchedule.create("cosine"), image_shape=(channels, 4, 4), device="cpu")


def test_sample_output_pil_is_the_tensor_as_pil_images():
    pipe = _pipe(3)
    kwargs = dict(sampler="ddim", num_steps=3)
    tensor = pipe.sample(3, generator=torch.Generator().manual_seed(1), **kwargs)
    pil = pipe.sample(3, generator=torch.Generator().manual_seed(1), output="pil", **kwargs)
    assert isinstance(pil, list) and len(pil) == 3 and all(isinstance(p, Image.Image) for p in pil)
    expected = np.rint((tensor.numpy() + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), expected)


def test_sample_output_refuses_what_it_cannot_return():
    with pytest.raises(dk.ConfigError, match="output='np'.*\"pt\".*\"pil\""):
        _pipe(3).sample(1, output="np")
    with pytest.raises(dk.ConfigError, match="needs 1 or 3 channels, the model makes 2"):
        _pipe(2).sample(1, output="pil")
