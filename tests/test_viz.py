"""Plots and grids: files are valid PNGs of the promised size and images land in the right cells."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.data import to_pixels
from diffusekit.viz import (ema_smooth, make_grid, plot_curves, plot_loss, plot_schedule,
                            save_grid, save_trajectory)


class StandInSchedule:
    """The schedule contract viz relies on: betas, alphas, alphas_cumprod, add_noise (float64)."""

    def __init__(self, kind: str, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps
        if kind == "linear":
            self.betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
        else:  # cosine (Improved DDPM eq. 17), betas clipped at 0.999
            s = torch.linspace(0, 1, num_train_timesteps + 1, dtype=torch.float64)
            f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            self.betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    def add_noise(self, x0, noise, t):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)


def _schedules(which: str):
    if which == "stand-in":
        return {"linear": StandInSchedule("linear"), "cosine": StandInSchedule("cosine")}
    schedule = pytest.importorskip("diffusekit.schedule", reason="schedule.py not written yet")
    return {"linear": schedule.NoiseSchedule.create("linear", num_train_timesteps=1000,
                                                    beta_start=1e-4, beta_end=0.02),
            "cosine": schedule.NoiseSchedule.create("cosine", num_train_timesteps=1000)}


def _png(path):
    assert path.exists()
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.load()
        return img.copy()


def _cells(n, c=1, h=3, w=4):
    # image k has constant value chosen so that its uint8 pixel value is 10 * k
    values = torch.tensor([10.0 * k for k in range(n)]) / 127.5 - 1
    return values.view(n, 1, 1, 1).expand(n, c, h, w).clone()


@pytest.mark.parametrize("c", [1, 3])
def test_make_grid_places_image_k_in_its_cell(c):
    n, nrow, pad, h, w = 7, 3, 2, 3, 4
    grid = make_grid(_cells(n, c, h, w), nrow=nrow, padding=pad, upscale=1)
    rows = math.ceil(n / nrow)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * (h + pad) + pad, nrow * (w + pad) + pad, c)
    for k in range(n):
        top, left = pad + (k // nrow) * (h + pad), pad + (k % nrow) * (w + pad)
        assert np.all(grid[top:top + h, left:left + w] == 10 * k), k
    assert np.all(grid[:pad] == 255) and np.all(grid[:, :pad] == 255)  # padding
    assert np.all(grid[pad + 2 * (h + pad):, pad + (w + pad):] == 255)  # empty cells of last row


def test_make_grid_upscales_small_images_nearest():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    grid = make_grid(x, nrow=2, padding=0)  # default upscale brings 8x8 to 64x64
    assert grid.shape == (128, 128, 1)
    pixels = to_pixels(x)
    np.testing.assert_array_equal(grid[64:128:8, 0:64:8], pixels[2])  # nearest neighbour blocks
    np.testing.assert_array_equal(grid[64 + 7:128:8, 64 + 7::8], pixels[3])
    assert make_grid(x, upscale=1, padding=0).shape == (16, 16, 1)


def test_save_grid_png(tmp_path):
    x = _cells(6, 3, 8, 8)
    path = save_grid(x, tmp_path / "out" / "grid.png", nrow=3, upscale=2)
    img = _png(path)
    assert img.size == (3 * 18 + 2, 2 * 18 + 2) and img.mode == "RGB"
    arr = np.asarray(img)
    assert np.all(arr[20:36, 38:54] == 50)  # image 5: row 1, column 2
    gray = _png(save_grid(_cells(2), tmp_path / "g.png", upscale=1))
    assert gray.mode == "L"


def test_trajectory_png(tmp_path):
    steps, batch = 12, 2
    xs = [torch.rand(batch, 1, 8, 8) * 2 - 1 for _ in range(steps)]
    x0 = [torch.rand(batch, 1, 8, 8) * 2 - 1 for _ in range(steps)]
    ts = np.linspace(999, 0, steps).round().tolist()
    img = _png(save_trajectory(xs, x0, tmp_path / "traj.png", timesteps=ts))
    assert img.size[0] > img.size[1] > 100
    single = _png(save_trajectory(torch.stack(xs)[:, 0], torch.stack(x0)[:, 0],
                                  tmp_path / "one.png"))
    assert single.size[1] < img.size[1]
    with pytest.raises(ValueError, match="timesteps"):
        save_trajectory(xs, x0, tmp_path / "bad.png", timesteps=[1, 2])


@pytest.mark.parametrize("which", ["stand-in", "real"])
def test_plot_schedule_png(tmp_path, which):
    from sklearn.datasets import load_digits
    image = torch.from_numpy(load_digits().images[0]).float().div(8).sub(1)[None]  # (1, 8, 8)
    scheds = _schedules(which)
    _png(plot_schedule(scheds, tmp_path / "sched.png", image=image))
    _png(plot_schedule(scheds, tmp_path / "curves_only.png"))


def test_plot_loss_and_curves(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(200):
            loss = float(np.exp(-step / 60) + 0.05 * rng.random())
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        f.write("\n")
    _png(plot_loss(path, tmp_path / "loss.png"))
    _png(plot_loss([{"step": 1, "loss": 1.0}, {"step": 2, "lr": 0.1}, {"step": 3, "loss": 0.5}],
                   tmp_path / "loss2.png"))
    with pytest.raises(ValueError, match="no records"):
        plot_loss([{"step": 1}], tmp_path / "none.png")
    _png(plot_curves({"ddim": ([5, 10, 20, 50], [40, 20, 12, 10]),
                      "dpmpp_2m": ([5, 10, 20, 50], [25, 12, 10, 9.5])},
                     tmp_path / "curves.png", xlabel="steps", ylabel="FID", logx=True, logy=True))


def test_ema_smooth_debiased():
    np.testing.assert_allclose(ema_smooth([3.0] * 5), 3.0)
    out = ema_smooth([0.0, 1.0], decay=0.5)
    # avg1 = 0, avg2 = 0.5; debiased: 0 / 0.5, 0.5 / 0.75
    np.testing.assert_allclose(out, [0.0, 2 / 3])
