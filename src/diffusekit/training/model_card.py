"""A run's model card: RUN/README.md with the Hub's YAML front matter (licence, library, tags, base model,
data sets), its data, configuration, latest sample grid, metrics and how to load it (written by the
trainer at every save, so it always describes the latest weights).

The front matter is what the Hugging Face Hub reads for its card preview and search
(`huggingface_hub.ModelCard.load(RUN / "README.md").data`). It is written through
`huggingface_hub.ModelCardData` where that is installed, and as JSON-style YAML (the same fields)
where it is not, so training never needs the Hub library. No path of this machine is written: the
load snippet names the folder relative to where it sits.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusekit.store import write_text_atomic
from diffusekit.store.hub import hub_repo_id

# the licence of the built-in data (NOTICE); a run on other data gets "other": its data's licence is the user's to state
DATA_LICENSES = {"digits": "cc-by-4.0", "shapes": "apache-2.0"}
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"


def card_metadata(cfg, base_model: list[str] | None = None, datasets: list[str] | None = None) -> dict:
    """The card's front matter for a run config: license, library_name, tags, pipeline_tag, base_model, datasets."""
    m, d = cfg.model, cfg.data
    kind = "text-to-image" if cfg.text is not None else ("class-conditional" if m.num_classes else "unconditional")
    pieces = []
    if cfg.text is not None and cfg.text.kind == "pretrained":
        pieces.append(MINILM_REPO if cfg.text.path == "minilm" else hub_repo_id(cfg.text.path))
    if cfg.latent is not None:
        pieces.append(hub_repo_id(cfg.latent.autoencoder))
    base = [*(base_model or []), *(p for p in pieces if p)]
    named = [*(datasets or []), *filter(None, [hub_repo_id(d.source, "datasets")])]
    meta = {"license": DATA_LICENSES.get(d.source, "other"), "library_name": "diffusekit",
            "tags": ["diffusekit", "diffusion", kind] + (["latent-diffusion"] if cfg.latent is not None else []),
            "pipeline_tag": {"text-to-image": "text-to-image", "unconditional": "unconditional-image-generation"}
            .get(kind)}
    if base:
        meta["base_model"] = list(dict.fromkeys(base)) if len(set(base)) > 1 else base[0]
    if named:
        meta["datasets"] = list(dict.fromkeys(named))
    return {k: v for k, v in meta.items() if v is not None}


def front_matter(meta: dict) -> str:
    """`---\\n<YAML>\\n---\\n`: through huggingface_hub.ModelCardData where installed, else one JSON value a line."""
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        body = "\n".join(f"{key}: {json.dumps(value)}" for key, value in meta.items())   # JSON is YAML
    else:
        body = ModelCardData(**meta).to_yaml()
    return f"---\n{body}\n---\n"


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    last: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            last.update({k: v for k, v in json.loads(line).items() if v is not None})
    return last


def write_model_card(run_dir: str | Path, cfg, step: int, base_model: list[str] | None = None,
                     datasets: list[str] | None = None) -> Path:
    """Write RUN/README.md for the run's config at `step`; returns its path."""
    run_dir = Path(run_dir)
    meta = card_metadata(cfg, base_model, datasets)
    text = front_matter(meta) + "\n".join(_card_body(run_dir, cfg, step, meta["license"]))
    return write_text_atomic(run_dir / "README.md", text)


def _card_body(run_dir: Path, cfg, step: int, license_id: str) -> list[str]:
    m, t, d = cfg.model, cfg.train, cfg.data
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    metrics = _last_metrics(run_dir)
    kind = "text-to-image" if cfg.text is not None else (f"class-conditional ({m.num_classes} classes)"
                                                         if m.num_classes else "unconditional")
    space = f"latents of the autoencoder in `autoencoder/` ({cfg.latent.image_size}px images)" if cfg.latent \
        else f"{m.image_size}x{m.image_size} pixels, {m.in_channels} channel(s)"
    data_name = d.source if d.source in DATA_LICENSES else (hub_repo_id(d.source, "datasets") or Path(d.source).name)
    lines = [
        f"# diffusekit run: {run_dir.name}", "",
        f"A {kind} denoising diffusion model on {space}, trained with diffusekit for {step} of {t.steps} steps.", "",
        "| | |", "| --- | --- |",
        f"| data | `{data_name}` (split {d.split}) |",
        f"| network | UNet, base channels {m.base_channels}, multipliers {list(m.channel_mult)}, attention at "
        f"{list(m.attention_resolutions)}, predicts `{m.prediction_type}` |",
        f"| schedule | {cfg.schedule.kind}, {cfg.schedule.num_train_timesteps} steps |",
        f"| training | batch {t.batch_size}, lr {t.lr} ({t.lr_schedule}), EMA {t.ema_decay}, {t.precision}, seed {t.seed} |",
    ]
    if cfg.text is not None:
        encoder = cfg.text.path if cfg.text.path == "minilm" else hub_repo_id(cfg.text.path) or Path(cfg.text.path).name
        lines.append(f"| text | {cfg.text.kind} encoder{' ' + encoder if encoder else ''}, "
                     f"{m.text_conditioning} conditioning |")
    for key in ("loss", "fd", "kid", "images_per_s"):
        if key in metrics:
            lines.append(f"| last {key} | {metrics[key]:.4g} |")
    if grids:
        lines += ["", f"![samples at step {grids[-1].stem[5:].lstrip('0') or 0}](samples/{grids[-1].name})"]
    if license_id == "other":
        lines += ["", "The licence is marked `other`: set `license:` above to the licence of the training data "
                      "before sharing the weights."]
    return lines + [
        "", "## Load it", "", f"From the folder that holds this run (`{run_dir.name}/`):", "",
        "```python", "import diffusekit as dk", f'pipe = dk.Pipeline.load("{run_dir.name}")',
        "images = pipe.sample(16, sampler=\"dpmpp_2m\", num_steps=20)   # (16, C, H, W) in [-1, 1]",
        f'dk.save_grid(images, "grid.png")', "```",
        "", "```bash", f"diffusekit sample {run_dir.name} --n 64 --out grid.png", "```",
        "", "Every setting is in `config.json`; `model.safetensors` holds the EMA weights.", ""]
