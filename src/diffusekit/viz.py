"""Pictures of what a diffusion model does: image grids, denoising trajectories, schedules, losses.

Plots use matplotlib's object API with the Agg canvas (no pyplot, so importing this module never
changes the global backend or opens a window); image grids are written with Pillow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from diffusekit.data import to_pixels, write_pixels

DEFAULT_TS = (0, 100, 250, 500, 750, 999)


def auto_upscale(size: int, target: int = 64) -> int:
    """The integer factor that brings an image side of `size` to at least `target` pixels."""
    return max(1, math.ceil(target / size))


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
              upscale: int | None = None, pad_value: int = 255) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 (H', W', C) array, row by row.

    nrow: images per row (default ceil(sqrt(N))). upscale: integer nearest-neighbour factor
    (default: enough to make each image at least 64 px, so 8x8 digits stay visible; 1 = none).
    Image k sits in row k // nrow, column k % nrow, with `padding` pixels around every cell.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid expects (N, C, H, W) with C = 1 or 3, "
                         f"got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    factor = upscale or auto_upscale(min(h, w))
    pixels = to_pixels(images)  # (N, h, w, C) uint8
    if factor > 1:
        pixels = pixels.repeat(factor, axis=1).repeat(factor, axis=2)
    h, w = h * factor, w * factor
    grid = np.full((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                   pad_value, dtype=np.uint8)
    for k in range(n):
        top, left = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[k]
    return grid


def _save_pixels(pixels: np.ndarray, path: str | Path) -> Path:
    """Through a temporary file and os.replace (data.write_pixels): a killed or failed write leaves no half image."""
    return write_pixels(pixels, path)


def to_pil(images: torch.Tensor) -> list:
    """Images (N, C, H, W) or (C, H, W) in [-1, 1], C = 1 or 3, as a list of PIL images ("L" or "RGB"), as
    diffusers pipelines return them: pixel = round((x + 1) / 2 * 255), clamped."""
    from PIL import Image
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_pil expects (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}; "
                         "a latent model's pipe.sample(...) already decodes to pixels.")
    pixels = to_pixels(images)  # (N, H, W, C) uint8
    return [Image.fromarray(p[:, :, 0] if p.shape[-1] == 1 else p) for p in pixels]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2,
              upscale: int | None = None) -> Path:
    """Write make_grid(images) to an image file (format from the suffix); returns the path."""
    return _save_pixels(make_grid(images, nrow=nrow, padding=padding, upscale=upscale), path)


# ---------------------------------------------------------------------------------------------
# figures


def figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | Path, dpi: int = 110, tight: bool = False) -> Path:
    """fig to path (format from the suffix) through a temporary file and os.replace, so a kill or a full
    disk mid-write leaves the previous picture, never a truncated one. tight: crop the figure to what is drawn
    (a small pad), for figures whose drawn area's shape is not known in advance (an image beside text)."""
    from diffusekit.store import replace_atomically
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    crop = {"bbox_inches": "tight", "pad_inches": 0.05} if tight else {}
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt, **crop))


def show_grid(ax, grid: np.ndarray, col_labels: Sequence[str], row_labels: Sequence[str],
               cell: tuple[int, int], padding: int) -> None:
    """Draw a make_grid array on ax with a label under each column centre and beside each row."""
    h, w = cell
    ax.imshow(grid[:, :, 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([padding + j * (w + padding) + w / 2 for j in range(len(col_labels))],
                  list(col_labels), fontsize=8)
    ax.set_yticks([padding + i * (h + padding) + h / 2 for i in range(len(row_labels))],
                  list(row_labels), fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _pick_columns(num: int, max_cols: int) -> list[int]:
    """Up to max_cols indices spread evenly over range(num), always keeping the first and last."""
    if num <= max_cols:
        return list(range(num))
    return sorted(set(np.linspace(0, num - 1, max_cols).round().astype(int).tolist()))


def save_trajectory(xs: Sequence[torch.Tensor] | torch.Tensor,
                    x0_preds: Sequence[torch.Tensor] | torch.Tensor, path: str | Path,
                    timesteps: Sequence[float] | None = None, max_cols: int = 10,
                    upscale: int | None = None) -> Path:
    """Plot x_t and the predicted x0 along a denoising path, one column per step, labelled with t.

    xs, x0_preds: S steps of (B, C, H, W) in [-1, 1] (a list or a (S, B, C, H, W) tensor), as a
    sampler's callback reports them: xs[j] is x after step j, x0_preds[j] the prediction made in it;
    xs[-1] is the final sample. Each sample gets two rows (x_t above x0_pred). timesteps: the S
    model-call timesteps (StepInfo.t). Column j is labelled with the level of the x it shows, the
    next step's timestep timesteps[j + 1]; the last column, always shown, is labelled "x0". At most
    max_cols steps are shown, evenly spaced.
    """
    xs, x0_preds = torch.stack(list(xs)), torch.stack(list(x0_preds))
    if xs.ndim == 4:  # (S, C, H, W): a single sample
        xs, x0_preds = xs[:, None], x0_preds[:, None]
    if xs.shape != x0_preds.shape:
        raise ValueError(f"xs {tuple(xs.shape)} and x0_preds {tuple(x0_preds.shape)} differ")
    steps, batch = xs.shape[:2]
    if timesteps is not None and len(timesteps) != steps:
        raise ValueError(f"{len(timesteps)} timesteps for {steps} steps")
    cols = _pick_columns(steps, max_cols)
    # rows: sample b gives x_t then x0_pred; (rows * cols, C, H, W) in row-major order
    rows = torch.stack([torch.stack([xs[cols, b], x0_preds[cols, b]]) for b in range(batch)])
    cells = rows.flatten(0, 2)
    padding, factor = 2, upscale or auto_upscale(min(xs.shape[-2:]))
    grid = make_grid(cells, nrow=len(cols), padding=padding, upscale=factor)
    labels = [_column_label(j, steps, timesteps) for j in cols]
    row_labels = [name + (f" [{b}]" if batch > 1 else "") for b in range(batch)
                  for name in ("x_t", "x0_pred")]
    h, w = xs.shape[-2] * factor, xs.shape[-1] * factor
    fig = figure(1.0 + 0.9 * len(cols), 0.4 + 0.9 * len(row_labels))
    ax = fig.add_subplot()
    show_grid(ax, grid, labels, row_labels, (h, w), padding)
    ax.set_title("denoising trajectory: x after each step (at the t shown) and the x0 predicted in that step",
                 fontsize=9)
    return save_figure(fig, path)


def _column_label(j: int, steps: int, timesteps: Sequence[float] | None) -> str:
    """The noise level of xs[j]: step j ends at the timestep step j + 1 is called at; the last is x0."""
    if j == steps - 1:
        return "x0"
    return f"t={fmt_t(timesteps[j + 1])}" if timesteps is not None else f"after step {j}"


def fmt_t(t) -> str:
    t = float(t)
    return str(int(t)) if t == int(t) else f"{t:.1f}"


def plot_schedule(schedules: Mapping[str, object], path: str | Path,
                  image: torch.Tensor | None = None, ts: Iterable[int] = DEFAULT_TS,
                  seed: int = 0) -> Path:
    """Plot beta_t, alpha_t, abar_t, sqrt(abar_t), sqrt(1 - abar_t) for each named schedule.

    With `image` ((C, H, W) or (1, C, H, W) in [-1, 1]), add one strip per schedule of that image
    noised to each t in ts with the same seeded eps: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    (DDPM eq. 4), computed by the schedule's add_noise.
    """
    curves = [("beta_t", lambda s: s.betas, True), ("alpha_t", lambda s: s.alphas, False),
              ("abar_t (alphas_cumprod)", lambda s: s.alphas_cumprod, False),
              ("sqrt(abar_t) and sqrt(1 - abar_t)", None, False)]
    has_strip = image is not None
    fig = figure(13, 3.3 + (1.0 * len(schedules) + 0.5 if has_strip else 0))
    ratios = [3, 0.3 + 1.0 * len(schedules)] if has_strip else None
    grid_spec = fig.add_gridspec(2 if has_strip else 1, len(curves), height_ratios=ratios)
    for i, (title, get, logy) in enumerate(curves):
        ax = fig.add_subplot(grid_spec[0, i])
        for j, (name, sched) in enumerate(schedules.items()):
            color = f"C{j}"
            t = np.arange(int(sched.num_train_timesteps))
            if get is None:
                abar = _numpy(sched.alphas_cumprod)
                ax.plot(t, np.sqrt(abar), color=color, label=f"{name}: sqrt(abar_t)")
                ax.plot(t, np.sqrt(1 - abar), color=color, ls="--", label=f"{name}: sqrt(1-abar_t)")
            else:
                ax.plot(t, _numpy(get(sched)), color=color, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("t")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has_strip:
        ax = fig.add_subplot(grid_spec[1, :])
        _noised_strip(ax, schedules, image, list(ts), seed)
    return save_figure(fig, path)


def _noised_strip(ax, schedules: Mapping[str, object], image: torch.Tensor, ts: list[int],
                  seed: int) -> None:
    x0 = image if image.ndim == 4 else image[None]  # (1, C, H, W)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    rows = []
    for sched in schedules.values():
        t_max = int(sched.num_train_timesteps) - 1
        t = torch.tensor([min(int(s), t_max) for s in ts], dtype=torch.long)
        x_t = sched.add_noise(x0.expand(len(ts), -1, -1, -1), noise.expand(len(ts), -1, -1, -1), t)
        rows.append(x_t.float())
    cells = torch.cat(rows)  # (num_schedules * len(ts), C, H, W)
    factor, padding = auto_upscale(min(x0.shape[-2:])), 2
    grid = make_grid(cells, nrow=len(ts), padding=padding, upscale=factor)
    show_grid(ax, grid, [f"t={t}" for t in ts], list(schedules),
               (x0.shape[-2] * factor, x0.shape[-1] * factor), padding)
    ax.set_title(f"x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (same eps, seed {seed})",
                 fontsize=9)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl file (one JSON object per line; blank lines ignored)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def ema_smooth(values: Sequence[float], decay: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average, as TensorBoard's smoothing (Adam's correction)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        # avg_i = decay * avg_{i-1} + (1 - decay) * v_i ; debiased by 1 - decay^(i+1)
        avg = decay * avg + (1 - decay) * float(v)
        out[i] = avg / (1 - decay ** (i + 1))
    return out


def plot_loss(metrics: str | Path | Sequence[Mapping], path: str | Path, key: str = "loss",
              decay: float = 0.98) -> Path:
    """Plot `key` against step from metrics.jsonl records: raw (faint) and EMA-smoothed, log y."""
    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    rows = [r for r in records if key in r and r[key] is not None]
    if not rows:
        raise ValueError(f"no records with {key!r} to plot (got {len(records)} records).")
    steps = np.array([r.get("step", i) for i, r in enumerate(rows)], dtype=float)
    values = np.array([r[key] for r in rows], dtype=float)
    fig = figure(7, 4)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="C0", alpha=0.25, lw=0.8, label=f"{key} (raw)")
    ax.plot(steps, ema_smooth(values, decay), color="C0", lw=1.8, label=f"{key} (EMA {decay})")
    if np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def plot_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                xlabel: str = "", ylabel: str = "", title: str = "", logx: bool = False,
                logy: bool = False, markers: bool = True) -> Path:
    """Plot several named (x, y) series on one labelled axis, e.g. FID against sampling steps."""
    fig = figure(7, 4.5)
    ax = fig.add_subplot()
    for name, (x, y) in series.items():
        ax.plot(_numpy(x), _numpy(y), marker="o" if markers else None, ms=3, label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if series:
        ax.legend()
    return save_figure(fig, path)


def save_labelled_grid(images: torch.Tensor, path: str | Path, nrow: int, row_labels: Sequence[str],
                       padding: int = 2) -> Path:
    """A grid with a text label beside each row (e.g. the prompt the row was sampled from)."""
    upscale = auto_upscale(images.shape[-1])
    grid = make_grid(images, nrow=nrow, padding=padding, upscale=upscale)
    h, w = images.shape[-2] * upscale, images.shape[-1] * upscale
    fig = figure(2 + grid.shape[1] / 60, 0.5 + grid.shape[0] / 60)
    show_grid(fig.add_subplot(), grid, [""] * nrow, list(row_labels), (h, w), padding)
    return save_figure(fig, path, tight=True)  # the labels' width is unknown: crop, no empty bands
