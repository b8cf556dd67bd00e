"""Pictures of the diffusion process itself on one image: forward noising, the step-by-step chain
against the one-jump formula, the model's noise prediction, and naive one-step denoising against sampling.

`plot_process` writes all of them; the functions beside it compute what each picture shows, so the
claims the pictures make (the chain and the jump agree; one jump is not sampling) can be tested.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import ConfigError, check_choice
from .device import randn
from .viz import auto_upscale, figure, fmt_t, save_figure, show_grid, make_grid

# pixel values pooled into each chain-vs-jump histogram: the mean and std of 65536 values agree to
# about 5 * sqrt(2 / 65536) ~ 0.03 or better between two independent samples of one distribution
CHAIN_PIXELS = 1 << 16
NOISE_DISPLAY_SCALE = 3.0   # eps is shown as eps / 3, so +-3 standard deviations fill [-1, 1]
MAX_ROWS = 4                # images shown in the forward-process strip
NAIVE_IMAGES = 8            # images in the naive-vs-sampling picture


def default_ts(num_train_timesteps: int) -> list[int]:
    """Six timesteps spread over [0, T - 1]: 0, T/10, T/4, T/2, 3T/4, T - 1."""
    T = int(num_train_timesteps)
    return sorted({0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1})


def _check_ts(ts, T: int) -> list[int]:
    ts = [int(t) for t in ts]
    bad = [t for t in ts if not 0 <= t < T]
    if not ts or bad:
        raise ConfigError(f"ts={ts} must be a non-empty list of timesteps in [0, {T - 1}] "
                          f"(the schedule has T={T}); got {bad or 'none'} outside it.")
    return sorted(set(ts))


def _as_images(image: torch.Tensor) -> torch.Tensor:
    x0 = image if image.ndim == 4 else image[None]
    if x0.ndim != 4 or x0.shape[1] not in (1, 3):
        raise ConfigError(f"image has shape {tuple(image.shape)}; give (C, H, W) or (N, C, H, W) "
                          f"with C = 1 or 3, values in [-1, 1].")
    return x0.detach().cpu().float()


# --- what the pictures show ---------------------------------------------------------------------

def forward_chain(schedule, x0: torch.Tensor, ts: Sequence[int],
                  generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
    """x at each t in ts from running the forward chain one step at a time from x0 (float64, CPU).

    Timestep index t (0-based, as in the schedule's tables) is t + 1 steps of the chain.
    """
    ts = sorted(int(t) for t in ts)
    x = x0.detach().cpu().double()
    betas, alphas = schedule.betas.double().cpu(), schedule.alphas.double().cpu()
    out = {}
    for t in range(ts[-1] + 1):
        # noise drawn in float32 (several times faster to draw) and accumulated in float64
        eps = torch.randn(x.shape, generator=generator).double()
        # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t   (DDPM eq. 2, one step of q(x_t | x_{t-1}))
        x = alphas[t].sqrt() * x + betas[t].sqrt() * eps
        if t in ts:
            out[t] = x.clone()
    return out


def forward_jump(schedule, x0: torch.Tensor, ts: Sequence[int],
                 generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
    """x at each t in ts drawn in one jump with the schedule's add_noise (float64, CPU), fresh eps per t."""
    x0 = x0.detach().cpu().double()
    out = {}
    for t in sorted(int(t) for t in ts):
        eps = torch.randn(x0.shape, generator=generator).double()
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM eq. 4)
        out[t] = schedule.add_noise(x0, eps, torch.full((x0.shape[0],), t, dtype=torch.long))
    return out


def max_stat_differences(chain: dict[int, torch.Tensor],
                         jump: dict[int, torch.Tensor]) -> tuple[float, float]:
    """(max over t of |mean difference|, max over t of |std difference|) of the pooled pixel values."""
    dmean = max(abs(float(chain[t].mean() - jump[t].mean())) for t in chain)
    dstd = max(abs(float(chain[t].std() - jump[t].std())) for t in chain)
    return dmean, dstd


@torch.no_grad()
def noise_prediction(pipe, x0: torch.Tensor, ts: Sequence[int], generator: torch.Generator | None = None):
    """(x_t, true eps, predicted eps), each (len(ts), C, H, W) on the CPU: one image noised to every t
    with one eps, and the model's eps prediction for each (unconditional for a class-conditional model)."""
    x0 = x0[:1].to(pipe.device).expand(len(ts), -1, -1, -1)
    eps = randn(x0.shape[1:], generator, pipe.device)[None].expand_as(x0)
    t = torch.as_tensor(list(ts), dtype=torch.long)
    x_t = pipe.schedule.add_noise(x0, eps, t)
    abar = pipe.schedule.alphas_cumprod[t]
    pred = pipe.denoiser()(x_t, t.float(), abar)
    return x_t.cpu(), eps.cpu(), pred.eps.float().cpu()


@torch.no_grad()
def naive_vs_sampling(pipe, x_T: torch.Tensor, *, sampler: str = "ddim", num_steps: int = 50,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(naive, sampled) from the same noise x_T (N, C, H, W): naive subtracts the predicted noise in one
    go at t = T - 1 (unclamped, so its blow-up shows); sampled runs the sampler (clamped to [-1, 1])."""
    T = int(pipe.schedule.num_train_timesteps)
    x = x_T.to(pipe.device)
    abar = float(pipe.schedule.alphas_cumprod[T - 1])
    pred = pipe.denoiser()(x, torch.full((len(x),), float(T - 1)), abar)
    if abar > 0:
        # x0 = (x_t - sqrt(1 - abar_t) eps_pred) / sqrt(abar_t)   (DDPM eq. 4 solved for x0)
        naive = (x - math.sqrt(1 - abar) * pred.eps) / math.sqrt(abar)
    else:  # zero terminal SNR: the formula divides by 0, so take the model's own x0 estimate
        naive = pred.x0
    sampled = pipe.sample(len(x), sampler, num_steps, generator=generator, noise=x_T.cpu())
    return naive.float().cpu(), sampled


# --- the pictures -------------------------------------------------------------------------------

def plot_process(out_dir: str | Path, schedule, image: torch.Tensor, pipe=None, *,
                 ts: Sequence[int] | None = None, seed: int = 0, num_steps: int = 50,
                 sampler: str = "ddim") -> list[Path]:
    """Write the process pictures into out_dir and return their paths, in this order:

    forward_process.png   the image(s) noised to each t in ts with one eps (DDPM eq. 4);
    chain_vs_jump.png     histograms of pixel values from the step-by-step chain (eq. 2) and the one
                          jump (eq. 4) at each t, with the largest mean and std differences in the title;
    and with a trained pipe (its image_shape must be the image's):
    noise_prediction.png  x_t, the true eps and the model's eps at each t, with the MSE under each;
    naive_vs_sampling.png one-step x0 = (x_T - sqrt(1 - abar) eps_pred) / sqrt(abar) from pure noise
                          beside `sampler` with num_steps from the same noise.
    image: (C, H, W) or (N, C, H, W) in [-1, 1]; ts default to default_ts(T). Each picture draws its
    noise from its own generator seeded with `seed`, so each is reproducible on its own.
    """
    from .samplers import SAMPLERS
    images = _as_images(image)
    T = int(schedule.num_train_timesteps)
    ts = _check_ts(default_ts(T) if ts is None else ts, T)
    out = Path(out_dir)
    gen = lambda: torch.Generator().manual_seed(int(seed))  # noqa: E731
    paths = [_plot_forward(out / "forward_process.png", schedule, images[:MAX_ROWS], ts, gen()),
             _plot_chain_vs_jump(out / "chain_vs_jump.png", schedule, images, ts, gen())]
    if pipe is None:
        return paths
    check_choice("sampler", sampler, sorted(SAMPLERS))
    if tuple(images.shape[1:]) != tuple(pipe.image_shape):
        raise ConfigError(f"image of shape {tuple(images.shape[1:])} does not match the model's "
                          f"{tuple(pipe.image_shape)}; load it with Pipeline.load_image(path).")
    paths.append(_plot_noise_prediction(out / "noise_prediction.png", pipe, images, ts, gen()))
    paths.append(_plot_naive(out / "naive_vs_sampling.png", pipe, sampler, num_steps, gen()))
    return paths


def _strip(ax, rows: list[torch.Tensor], col_labels, row_labels) -> None:
    """Rows of (K, C, H, W) images in [-1, 1] as one labelled grid on ax."""
    cells = torch.cat(rows).clamp(-1, 1)
    factor, padding = auto_upscale(min(cells.shape[-2:])), 2
    grid = make_grid(cells, nrow=len(rows[0]), padding=padding, upscale=factor)
    show_grid(ax, grid, col_labels, row_labels,
               (cells.shape[-2] * factor, cells.shape[-1] * factor), padding)


def _plot_forward(path: Path, schedule, images: torch.Tensor, ts: list[int], generator) -> Path:
    x0 = images.double()
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    abar = schedule.alphas_cumprod.double().cpu()
    rows = []
    for k in range(len(x0)):
        t = torch.tensor(ts, dtype=torch.long)
        x_t = schedule.add_noise(x0[k:k + 1].expand(len(ts), -1, -1, -1), eps[k:k + 1].expand(len(ts), -1, -1, -1), t)
        rows.append(torch.cat([x0[k:k + 1], x_t]).float())
    labels = ["x0"] + [f"t={t}\nsqrt(abar)={math.sqrt(float(abar[t])):.2f}" for t in ts]
    fig = figure(1.4 + 1.0 * len(labels), 0.9 + 1.0 * len(rows))
    ax = fig.add_subplot()
    _strip(ax, rows, labels, [f"image {k}" for k in range(len(rows))])
    ax.set_title("forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4; one eps "
                 "per image)", fontsize=9)
    return save_figure(fig, path)


def _plot_chain_vs_jump(path: Path, schedule, images: torch.Tensor, ts: list[int], generator) -> Path:
    reps = max(1, math.ceil(CHAIN_PIXELS / images.numel()))
    x0 = images.double().repeat(reps, 1, 1, 1)
    chain = forward_chain(schedule, x0, ts, generator)
    jump = forward_jump(schedule, x0, ts, generator)
    dmean, dstd = max_stat_differences(chain, jump)
    cols = min(len(ts), 3)
    fig = figure(4.0 * cols, 0.6 + 2.8 * math.ceil(len(ts) / cols))
    for i, t in enumerate(ts):
        ax = fig.add_subplot(math.ceil(len(ts) / cols), cols, i + 1)
        a, b = chain[t].flatten().numpy(), jump[t].flatten().numpy()
        bins = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 60)
        ax.hist(a, bins=bins, histtype="stepfilled", alpha=0.35, color="C0", label="chain, step by step")
        ax.hist(b, bins=bins, histtype="step", lw=1.5, color="C3", label="one jump")
        ax.set_title(f"t={t}: mean {a.mean():.3f} / {b.mean():.3f}, std {a.std():.3f} / {b.std():.3f}",
                     fontsize=8)
        ax.set_xlabel("pixel value of x_t", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"x_t = sqrt(alpha_t) x_(t-1) + sqrt(beta_t) eps, run t+1 times (DDPM eq. 2)  vs  "
                 f"x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps (eq. 4); {x0.numel()} pixel values each\n"
                 f"max |mean difference| = {dmean:.4f}, max |std difference| = {dstd:.4f}", fontsize=9)
    return save_figure(fig, path)


def _plot_noise_prediction(path: Path, pipe, images: torch.Tensor, ts: list[int], generator) -> Path:
    x_t, eps, eps_pred = noise_prediction(pipe, images[:1], ts, generator)
    mse = ((eps_pred - eps) ** 2).flatten(1).mean(1)
    rows = [x_t, eps / NOISE_DISPLAY_SCALE, eps_pred / NOISE_DISPLAY_SCALE]
    labels = [f"t={t}\nMSE {float(m):.3f}" for t, m in zip(ts, mse)]
    fig = figure(1.4 + 1.0 * len(ts), 1.0 + 1.0 * len(rows))
    ax = fig.add_subplot()
    _strip(ax, rows, labels, ["x_t", "true eps", "predicted eps"])
    ax.set_title(f"noise prediction: MSE = mean (eps_pred - eps)^2 per t; eps shown as "
                 f"eps / {NOISE_DISPLAY_SCALE:g}", fontsize=9)
    return save_figure(fig, path)


def _plot_naive(path: Path, pipe, sampler: str, num_steps: int, generator) -> Path:
    x_T = randn((NAIVE_IMAGES, *pipe.image_shape), generator, "cpu")
    naive, sampled = naive_vs_sampling(pipe, x_T, sampler=sampler, num_steps=num_steps, generator=generator)
    T = int(pipe.schedule.num_train_timesteps)
    abar = float(pipe.schedule.alphas_cumprod[T - 1])
    rows = [x_T / NOISE_DISPLAY_SCALE, naive.clamp(-1, 1), sampled]
    gap = float((rows[1] - sampled).abs().mean())
    fig = figure(1.4 + 1.0 * NAIVE_IMAGES, 1.3 + 1.0 * len(rows))
    ax = fig.add_subplot()
    _strip(ax, rows, [str(k) for k in range(NAIVE_IMAGES)],
           [f"x_T (/{NOISE_DISPLAY_SCALE:g})", "naive, one jump", f"{sampler}, {num_steps} steps"])
    ax.set_title(f"from the same noise x_T at t={fmt_t(T - 1)} (abar={abar:.2g}): naive x0 = (x_T - "
                 f"sqrt(1-abar) eps_pred) / sqrt(abar), values in [{float(naive.min()):.3g}, "
                 f"{float(naive.max()):.3g}] shown clamped to [-1, 1];\nproper sampling: {sampler} with "
                 f"{num_steps} steps; mean |naive - sampled| = {gap:.3f}",
                 fontsize=8)
    return save_figure(fig, path)
