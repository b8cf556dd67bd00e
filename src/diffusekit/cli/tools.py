"""`eval`, `tune-steps`, `export`, `make-shapes`, `plot-schedule`, `plot-process`, `demo`."""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from . import options as opt
from .app import main
from .conditioning import guidance_scale_option
from .options import friendly_errors


@main.command("eval")
@opt.run_argument
@click.option("--ref", "ref_source", default="digits", show_default=True,
              help="Reference data (as --data of train), brought to the run's image size and channels.")
@click.option("--ref-split", type=click.Choice(["train", "t10k"]), default="train", show_default=True,
              help="IDX split of the reference data.")
@click.option("--n", "n", type=click.IntRange(2, 1_000_000), default=5000, show_default=True,
              help="Samples to generate.")
@opt.background_option("the run's own")
@opt.sampler_options
@click.option("--features", default="raw", show_default=True,
              help="'raw' (pixels), 'classifier:PATH' (a train-classifier folder) or 'inception:WEIGHTS' "
                   "(pt_inception-2015-12-05-6726825d.pth, for FID).")
@guidance_scale_option
@click.option("--classes", type=click.Choice(["uniform", "none"]), default="uniform", show_default=True,
              help="Class-conditional runs: balanced labels, or none (unconditional).")
@click.option("--batch-size", type=click.IntRange(1), default=250, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".cache/diffusekit", show_default=True,
              help="Where reference statistics are cached.")
@opt.timesteps_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON here.")
@opt.network_options
@friendly_errors
def eval_run(run, ref_source, ref_split, background, n, sampler, steps, spacing, eta, karras, variance_type, features, guidance,
             classes, batch_size, cache_dir, timesteps_file, out, seed, dry_run, device, precision):
    """Score a run's samples: Frechet distance, KID, precision/recall, NFE and time.

    \b
    Example:
      diffusekit eval runs/mnist --ref path/to/mnist --ref-split t10k --n 5000 \\
        --sampler dpmpp_2m --steps 20 --features classifier:runs/judge --out eval.json
    """
    from ..data import DataConfig
    from ..evaluation import evaluate_run
    from ..store.run_config import read_run_config
    pipe = opt.load_pipeline(run, device, precision) if not dry_run else None
    sampler = opt.resolve_sampler(pipe, sampler) if pipe else (sampler or "dpmpp_2m")
    steps, tuned = opt.steps_plan(run, pipe, sampler, steps, timesteps_file, guidance) if pipe else (steps or 20, None)
    model = None if pipe else read_run_config(run).model        # --dry-run reads the shapes without loading
    c, size = (pipe.image_shape[0], pipe.image_shape[1]) if pipe else (model.in_channels, model.image_size)
    trained_on = getattr(getattr(pipe.config, "data", None), "alpha_background", None) if pipe else None
    ref = DataConfig(source=ref_source, split=ref_split, image_size=size, channels=c,
                     alpha_background=background or trained_on or "black")
    kw = opt.sampler_kwargs(spacing, eta, karras, variance_type)
    settings = dict(run=run, ref=ref.to_dict(), n=n, sampler=sampler, steps=steps, features=features,
                    guidance=guidance, classes=classes, batch_size=batch_size, cache_dir=cache_dir, seed=seed or 0,
                    out=out, device=device, timesteps=None if tuned is None else [float(v) for v in tuned], **kw)
    if dry_run:
        opt.dump(settings)
        return
    kw.update({"timesteps": tuned} if tuned is not None else {})
    with opt.quiet_notes():
        result = evaluate_run(pipe, ref, n, sampler=sampler, num_steps=steps, features=features,
                              cache_dir=cache_dir,
                              seed=seed or 0, batch_size=batch_size, guidance_scale=guidance,
                              class_labels="uniform" if classes == "uniform" else None, progress=True, **kw)
    width = max(len(k) for k in result)
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if out:
        from ..store import write_text_atomic
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({**result, "settings": settings}, indent=2) + "\n")
        click.echo(f"wrote {out}")


@main.command("tune-steps")
@opt.run_argument
@click.option("--nfe", type=click.IntRange(1, 1000), default=5, show_default=True, help="Model calls to place.")
@click.option("--sampler", type=click.Choice(sorted(n for n, s in opt.SAMPLERS.items() if not s.stochastic)),
              default="dpmpp_2m", show_default=True, help="A deterministic sampler.")
@click.option("--n", "n", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Noise images the discrepancy is measured on.")
@click.option("--reference-steps", type=click.IntRange(2, 10_000), default=100, show_default=True)
@click.option("--iterations", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Coordinate-descent sweeps.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance scale to tune for (the guided ODE differs from the plain one); "
                   "sample uses the file by default at this scale only.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Steps file to write [default: RUN/tuned_steps.json, which sample then uses by default].")
@opt.network_options
@friendly_errors
def tune_steps(run, nfe, sampler, n, reference_steps, iterations, guidance, out, seed, dry_run, device, precision):
    """Place a few model calls where they matter for this model: minimise the gap between an NFE-call
    solution and a many-step one from the same noise (in the spirit of "Align Your Steps").

    \b
    Example:
      diffusekit tune-steps runs/digits --nfe 5 --sampler dpmpp_2m
      diffusekit sample runs/digits --sampler dpmpp_2m        # uses runs/digits/tuned_steps.json
    """
    from ..tune import TUNED_STEPS_FILE, tune_pipeline_steps
    from ..store.hub import hub_repo_id
    if out is None and hub_repo_id(run):
        raise opt.UserError(f"{run} is a Hub repo in the local HF cache; give --out for the steps file "
                            "(the cache is not written into).")
    out = out or str(Path(run) / TUNED_STEPS_FILE)
    if dry_run:
        opt.dump(dict(run=run, nfe=nfe, sampler=sampler, n=n, reference_steps=reference_steps, iterations=iterations,
                      guidance=guidance, out=out, seed=seed or 0))
        return
    ts, _ = tune_pipeline_steps(opt.load_pipeline(run, device, precision), sampler, nfe, out, n=n,
                                reference_steps=reference_steps, iterations=iterations, guidance_scale=guidance,
                                generator=opt.generator(seed), progress=True)
    click.echo(f"wrote {out}: {nfe} model calls for {sampler} at t = {[round(float(t), 1) for t in ts]}")


@main.command()
@opt.run_argument
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["diffusers", "diffusers-lora"]), default="diffusers",
              show_default=True, help="diffusers: a pipeline folder; diffusers-lora: a LoRA run's adapter as "
                                      "pytorch_lora_weights.safetensors for diffusers' load_lora_weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (never a run folder).")
@opt.dry_run
@friendly_errors
def export(run, out, fmt, overwrite, dry_run):
    """Export a run as a diffusers pipeline folder (scheduler config + UNet weights in safetensors), or a LoRA
    run on a Stable-Diffusion-layout diffusers base as the file diffusers' load_lora_weights reads.

    OUT is a new folder outside the run (exporting into a run folder is refused).

    \b
    Example:
      diffusekit export runs/digits exported --format diffusers
      diffusekit export runs/sd-lora lora-out --format diffusers-lora
    """
    if dry_run:
        opt.dump(dict(run=run, out=out, format=fmt))
        return
    if fmt == "diffusers-lora":
        from ..interop.lora import export_diffusers_lora
        path = export_diffusers_lora(run, out)
        click.echo(f"wrote {path}: StableDiffusionPipeline.from_pretrained(BASE).load_lora_weights({out!r}) reads it.")
        return
    from ..interop.export import export_diffusers
    result = export_diffusers(run, out, overwrite=overwrite)
    if result.diffusers_loadable:
        click.echo(f"wrote {out}: a {result.pipeline_class} with a {result.scheduler_class} that diffusers loads "
                   f"(DDPMPipeline.from_pretrained({out!r})).")
    else:
        click.echo(f"wrote {out}: {result.note}")


@main.command("make-shapes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True, help="Images to write.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@opt.seed
@opt.dry_run
@friendly_errors
def make_shapes(out, n, split, overwrite, seed, dry_run):
    """Write the built-in captioned shapes set as an image folder with metadata.jsonl.

    \b
    Example:
      diffusekit make-shapes data/shapes --n 5000
      diffusekit train --data data/shapes --out runs/shapes
    """
    if dry_run:
        opt.dump(dict(out=out, n=n, split=split, seed=seed or 0))
        return
    from ..data.shapes import write_shapes_folder
    path = write_shapes_folder(out, n, seed=seed or 0, split=split, overwrite=overwrite)
    click.echo(f"wrote {n} images and metadata.jsonl to {path}")


def _digit(size: int = 32, channels: int = 1) -> torch.Tensor:
    """A built-in digit as a (1, C, size, size) image (a blank one for colour models)."""
    from ..data import DataConfig, load_dataset
    if channels != 1:
        return torch.zeros(1, channels, size, size)
    return load_dataset(DataConfig("digits", image_size=size, channels=channels)).images[:1]


@main.command("plot-schedule")
@click.option("--out", type=click.Path(dir_okay=False), default="schedule.png", help="Image to write.")
@click.option("--num-train-timesteps", "timesteps", type=click.IntRange(2, 100_000), default=1000,
              help="Training timesteps T (the schedule's num_train_timesteps).")
@click.option("--timesteps", "old_timesteps", type=click.IntRange(2, 100_000), default=None, hidden=True,
              help="Deprecated: --num-train-timesteps (elsewhere --timesteps is a steps file).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image for the noising strip (default: a built-in digit).")
@opt.seed
@opt.dry_run
@friendly_errors
def plot_schedule(out, timesteps, old_timesteps, image, seed, dry_run):
    """Plot beta_t, alpha_t, abar_t, sqrt(abar_t), sqrt(1 - abar_t) for linear and cosine schedules,
    and one image noised at several t.

    \b
    Example:
      diffusekit plot-schedule --out schedule.png
    """
    if old_timesteps is not None:
        opt.note("--timesteps is deprecated here: write --num-train-timesteps (sample's --timesteps is a steps file).")
        timesteps = old_timesteps
    if dry_run:
        opt.dump(dict(out=out, num_train_timesteps=timesteps, image=image, seed=seed or 0))
        return
    from ..data import load_image
    from ..schedule import NoiseSchedule
    from ..viz import plot_schedule as draw
    scheds = {kind: NoiseSchedule.create(kind, timesteps) for kind in ("linear", "cosine")}
    img = load_image(image, channels=3) if image else _digit()
    T = timesteps
    draw(scheds, out, image=img, ts=sorted({0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1}), seed=seed or 0)
    click.echo(f"wrote {out}")


@main.command("plot-process")
@click.argument("run", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--out", type=click.Path(file_okay=False), default="process", show_default=True, help="Folder to write.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image to noise (default: a training image of the run, or a built-in digit).")
@click.option("--steps", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Sampler steps.")
@opt.sampler_choice
@opt.network_options
@friendly_errors
def plot_process(run, out, image, steps, sampler, seed, dry_run, device, precision):
    """The source's pictures: the forward process, the chain against the one-jump formula and, with a
    RUN, the predicted against the true noise and naive one-jump denoising against proper sampling.

    \b
    Example:
      diffusekit plot-process --out process              # the forward part only
      diffusekit plot-process runs/digits --out process --sampler ddim
    """
    if dry_run:
        opt.dump(dict(run=run, out=out, image=image, steps=steps, sampler=sampler, seed=seed or 0))
        return
    from ..data import load_image
    from ..schedule import NoiseSchedule
    from ..viz_process import plot_process as draw
    pipe = opt.load_pipeline(run, device, precision) if run else None
    schedule = pipe.schedule if pipe else NoiseSchedule.create("linear", 1000)
    if image:
        img = pipe.load_image(image) if pipe else load_image(image)
    else:
        img = _digit(pipe.image_shape[1], pipe.image_shape[0]) if pipe else _digit()
    for path in draw(out, schedule, img, pipe, seed=seed or 0, num_steps=steps, sampler=sampler):
        click.echo(f"wrote {path}")


@main.command()
@opt.run_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on (127.0.0.1: this machine only).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--share", is_flag=True, help="Ask Gradio for a public link (off: the page runs models here).")
@opt.dry_run
@opt.device
@opt.precision
@friendly_errors
def demo(run, host, port, share, dry_run, device, precision):
    """Serve a web page to try a run: sample, edit, inpaint, invert-and-edit, schedule (pip install -e ".[demo]" from a clone).

    The page has its own seed field for each tab, so the command takes no seed.

    \b
    Example:
      diffusekit demo runs/digits            # then open http://127.0.0.1:7860
    """
    if dry_run:
        opt.dump(dict(run=run, host=host, port=port, share=share, device=device))
        return
    from ..demo import launch
    launch(run, host=host, port=port, share=share, device=device, precision=precision or "auto")
