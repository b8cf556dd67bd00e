"""Plots and grids: files are valid PNGs of the promised size and images land in the right cells;
the process pictures' claims hold (the chain and the jump agree; one naive jump is not sampling)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.data import to_pixels
from diffusekit.viz import (_column_label, ema_smooth, make_grid, plot_curves, plot_loss,
                            plot_schedule, save_grid, save_labelled_grid, save_trajectory)
from diffusekit.viz_process import (forward_chain, forward_jump, max_stat_differences,
                                    naive_vs_sampling, plot_process)


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


@pytest.mark.parametrize("rows,label", [(12, "[held-out tone] woman construction worker: dark skin tone, noto"),
                                         (2, "a cat")])
def test_labelled_grid_has_no_empty_bands(tmp_path, rows, label):
    """A labelled grid is cropped to what it draws: the first and last few pixel rows and columns hold ink (the
    emoji README grid had empty bands of a third of its height above and below the rows)."""
    x = torch.full((rows * 3, 3, 32, 32), -1.0)          # black images: every cell is ink
    img = np.asarray(_png(save_labelled_grid(x, tmp_path / "g.png", nrow=3, row_labels=[label] * rows)).convert("L"))
    ink_rows = np.nonzero((img < 200).any(1))[0]
    ink_cols = np.nonzero((img < 200).any(0))[0]
    h, w = img.shape
    assert ink_rows[0] < 0.05 * h and ink_rows[-1] > 0.95 * h, (ink_rows[0], ink_rows[-1], h)
    assert ink_cols[0] < 0.05 * w and ink_cols[-1] > 0.95 * w, (ink_cols[0], ink_cols[-1], w)


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


# --- the trajectory strip's labels ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_trajectory_columns_are_labelled_with_the_level_of_the_x_shown(name):
    import diffusekit as dk
    sched = dk.NoiseSchedule.create("linear", 1000)
    seen = []
    zero_eps = lambda x, t, **cond: torch.zeros_like(x)  # noqa: E731
    dk.get_sampler(name, sched).sample(zero_eps, torch.randn(1, 1, 4, 4), 6, callback=seen.append)
    ts, steps = [info.t for info in seen], len(seen)
    for j, info in enumerate(seen):
        label = _column_label(j, steps, ts)
        if j == steps - 1:
            assert label == "x0" and info.abar_next == 1.0  # the final column is the clean sample
        else:
            # x after step j sits at the noise level of the timestep the next step is called at
            assert label == f"t={ts[j + 1]:g}" or label == f"t={ts[j + 1]:.1f}"
            assert sched.alpha_bar_at(torch.tensor(ts[j + 1])) == pytest.approx(info.abar_next, rel=1e-9)


# --- the process pictures -------------------------------------------------------------------------

def _digits(n=16):
    from sklearn.datasets import load_digits
    return torch.from_numpy(load_digits().images[:n]).float().div(8).sub(1)[:, None]  # (n, 1, 8, 8)


def _tolerances(x0, abar, n):
    """5 standard errors of the difference of two independent estimates of the pooled mean and std of
    N = n pixel values v_i = sqrt(abar) x0_i + sqrt(1 - abar) eps_i (x0 fixed, eps independent)."""
    s2, var_m = 1 - abar, float((abar ** 0.5 * x0).double().var())
    se_mean = math.sqrt(s2 / n)
    # Var(sample variance) = (4 s^2 Var(m) + 2 s^4) / N; delta method: SE(std) = SE(var) / (2 std)
    se_std = math.sqrt((4 * s2 * var_m + 2 * s2 ** 2) / n) / (2 * math.sqrt(var_m + s2))
    return 5 * math.sqrt(2) * se_mean, 5 * math.sqrt(2) * se_std


TS = [0, 100, 250, 500, 999]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_step_by_step_chain_and_the_one_jump_agree(kind):
    import diffusekit as dk
    sched = dk.NoiseSchedule.create(kind, 1000)
    x0 = _digits(16).repeat(16, 1, 1, 1).double()  # 16384 pixel values, 16 different images
    g = torch.Generator().manual_seed(0)
    chain, jump = forward_chain(sched, x0, TS, g), forward_jump(sched, x0, TS, g)
    for t in TS:
        tol_mean, tol_std = _tolerances(x0, float(sched.alphas_cumprod[t]), x0.numel())
        dmean, dstd = max_stat_differences({t: chain[t]}, {t: jump[t]})
        assert dmean < tol_mean and dstd < tol_std, (t, dmean, tol_mean, dstd, tol_std)
    # per pixel too: the chain's mean over copies is sqrt(abar) x0 (each pixel has 16 copies)
    abar = float(sched.alphas_cumprod[100])
    per_pixel = chain[100].view(16, 16, 64).mean(0) - abar ** 0.5 * x0[:16].view(16, 64)
    assert float(per_pixel.abs().max()) < 5 * math.sqrt((1 - abar) / 16)


def test_a_chain_without_the_square_root_on_beta_is_caught():
    import diffusekit as dk
    sched = dk.NoiseSchedule.create("linear", 1000)
    # x_t = sqrt(alpha_t) x_{t-1} + beta_t eps: the classic slip, from betas' = betas^2
    wrong = SimpleNamespace(betas=sched.betas ** 2, alphas=sched.alphas)
    x0 = _digits(16).repeat(16, 1, 1, 1).double()
    g = torch.Generator().manual_seed(0)
    chain, jump = forward_chain(wrong, x0, [250], g), forward_jump(sched, x0, [250], g)
    _, tol_std = _tolerances(x0, float(sched.alphas_cumprod[250]), x0.numel())
    assert max_stat_differences(chain, jump)[1] > 10 * tol_std


@pytest.fixture(scope="module")
def tiny_pipe():
    import diffusekit as dk
    from diffusekit.nn.unet import UNet, UNetConfig
    from diffusekit.pipeline import Pipeline
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny8", num_classes=0))
    # a fresh UNet outputs exactly 0 (zero-initialised output layers), and with eps_pred = 0 the naive
    # jump and DDIM both return x_T / sqrt(abar_T); random weights there make it predict some noise
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    return Pipeline(model, dk.NoiseSchedule.create("linear", 1000), image_shape=(1, 8, 8),
                    prediction_type="epsilon", num_classes=0)


def _nontrivial_png(path):
    img = _png(path)
    arr = np.asarray(img.convert("L"), dtype=float)
    assert img.size[0] > 300 and img.size[1] > 150 and arr.std() > 10, (path.name, img.size)


@pytest.mark.parametrize("which", ["stand-in", "real"])
def test_plot_process_without_a_model_writes_the_forward_pictures(tmp_path, which):
    sched = _schedules(which)["linear"]
    paths = plot_process(tmp_path / "out", sched, _digits(2), ts=[0, 50, 300, 999])
    assert [p.name for p in paths] == ["forward_process.png", "chain_vs_jump.png"]
    for p in paths:
        _nontrivial_png(p)


def test_plot_process_with_a_model_writes_four_pictures(tmp_path, tiny_pipe):
    paths = plot_process(tmp_path, tiny_pipe.schedule, _digits(1)[0], tiny_pipe, num_steps=5, sampler="ddim")
    assert [p.name for p in paths] == ["forward_process.png", "chain_vs_jump.png", "noise_prediction.png",
                                       "naive_vs_sampling.png"]
    for p in paths:
        _nontrivial_png(p)
    import diffusekit as dk
    with pytest.raises(dk.ConfigError, match="does not match the model"):
        plot_process(tmp_path, tiny_pipe.schedule, torch.zeros(3, 8, 8), tiny_pipe)
    with pytest.raises(dk.ConfigError, match="ts="):
        plot_process(tmp_path, tiny_pipe.schedule, _digits(1), ts=[5, 1000])
    with pytest.raises(dk.ConfigError, match="sampler"):
        plot_process(tmp_path, tiny_pipe.schedule, _digits(1), tiny_pipe, sampler="dmpp")


def test_naive_one_jump_differs_from_sampling(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(8, 1, 8, 8, generator=g)
    naive, sampled = naive_vs_sampling(tiny_pipe, x_T, sampler="ddim", num_steps=5, generator=g)
    assert naive.shape == sampled.shape == x_T.shape
    # an untrained net's eps_pred is far from x_T, and dividing by sqrt(abar_T) ~ 0.006 blows that up
    assert float(naive.abs().max()) > 10 and float(sampled.abs().max()) <= 1
    assert not torch.equal(naive.clamp(-1, 1), sampled)


def test_naive_one_jump_gives_the_mean_image_and_sampling_gives_the_data_spread():
    # Gaussian data x0 ~ N(mu, s^2 I) with its exact denoiser: one jump from x_T returns
    # E[x0 | x_T] ~ mu for every image (almost no spread), sampling returns the data's spread s
    import diffusekit as dk
    from diffusekit.pipeline import Pipeline
    from diffusekit.toy import ExactDenoiserModel, GaussianMixture
    sched, s, n = dk.NoiseSchedule.create("linear", 1000), 0.3, 256
    mu = 0.4 * torch.sin(torch.arange(64, dtype=torch.float64))[None]          # (1, 64)
    pipe = Pipeline(ExactDenoiserModel(GaussianMixture(mu, [s]), sched), sched, image_shape=(1, 8, 8))
    g = torch.Generator().manual_seed(0)
    # a second-order solver: first-order DDIM at 50 steps visibly shrinks the spread of narrow data
    naive, sampled = naive_vs_sampling(pipe, torch.randn(n, 1, 8, 8, generator=g), sampler="dpmpp_2m",
                                       num_steps=50, generator=g)
    naive, sampled = naive.double().view(n, 64), sampled.double().view(n, 64)
    spread = lambda x: float(x.var(0).mean().sqrt())  # noqa: E731  (pooled per-pixel std over images)
    se = s / math.sqrt(2 * n * 64)
    assert spread(naive) < 0.05 * s
    torch.testing.assert_close(naive.mean(0, keepdim=True), mu, atol=0.01, rtol=0)
    # 5 standard errors plus 3% for the solver's discretisation error at 50 steps
    assert abs(spread(sampled) - s) < 5 * se + 0.03 * s, spread(sampled)
