"""A run's model card: RUN/README.md with its data, configuration, latest sample grid, metrics and
how to load it (written by the trainer at every save, so it always describes the latest weights)."""
from __future__ import annotations

import json
from pathlib import Path

from diffusekit.store import write_text_atomic


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    last: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            last.update({k: v for k, v in json.loads(line).items() if v is not None})
    return last


def write_model_card(run_dir: str | Path, cfg, step: int) -> Path:
    """Write RUN/README.md for the run's config at `step`; returns its path."""
    run_dir = Path(run_dir)
    m, t, d = cfg.model, cfg.train, cfg.data
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    metrics = _last_metrics(run_dir)
    kind = "text-to-image" if cfg.text is not None else (f"class-conditional ({m.num_classes} classes)"
                                                         if m.num_classes else "unconditional")
    space = f"latents of the autoencoder in `autoencoder/` ({cfg.latent.image_size}px images)" if cfg.latent \
        else f"{m.image_size}x{m.image_size} pixels, {m.in_channels} channel(s)"
    lines = [
        f"# diffusekit run: {run_dir.name}", "",
        f"A {kind} denoising diffusion model on {space}, trained with diffusekit for {step} of {t.steps} steps.", "",
        "| | |", "| --- | --- |",
        f"| data | `{d.source}` (split {d.split}) |",
        f"| network | UNet, base channels {m.base_channels}, multipliers {list(m.channel_mult)}, attention at "
        f"{list(m.attention_resolutions)}, predicts `{m.prediction_type}` |",
        f"| schedule | {cfg.schedule.kind}, {cfg.schedule.num_train_timesteps} steps |",
        f"| training | batch {t.batch_size}, lr {t.lr} ({t.lr_schedule}), EMA {t.ema_decay}, {t.precision}, seed {t.seed} |",
    ]
    if cfg.text is not None:
        lines.append(f"| text | {cfg.text.kind} encoder{' ' + cfg.text.path if cfg.text.path else ''}, "
                     f"{m.text_conditioning} conditioning |")
    for key in ("loss", "fd", "kid", "images_per_s"):
        if key in metrics:
            lines.append(f"| last {key} | {metrics[key]:.4g} |")
    if grids:
        lines += ["", f"![samples at step {grids[-1].stem[5:].lstrip('0') or 0}](samples/{grids[-1].name})"]
    lines += ["", "## Load it", "", "```python", "import diffusekit as dk",
              f'pipe = dk.Pipeline.load("{run_dir}")',
              "images = pipe.sample(16, sampler=\"dpmpp_2m\", num_steps=20)   # (16, C, H, W) in [-1, 1]", "```",
              "", "```bash", f"diffusekit sample {run_dir} --n 64 --out grid.png", "```",
              "", "Every setting is in `config.json`; `model.safetensors` holds the EMA weights.", ""]
    return write_text_atomic(run_dir / "README.md", "\n".join(lines))
