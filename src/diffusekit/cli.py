"""The `diffusekit` command: a thin layer over the library (no math, no training loop here)."""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click
import torch

from .samplers import SAMPLERS
from .samplers.base import SAMPLER_SPACINGS

SAMPLER_CHOICE = click.Choice(sorted(SAMPLERS))
SPACING_CHOICE = click.Choice(list(SAMPLER_SPACINGS))


def friendly_errors(fn):
    """Turn the library's input errors into one clean message and exit code 1 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .checkpoint import CheckpointError
        from .config import ConfigError
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e
    return wrapper


def seed_option(fn):
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="Seed for every random choice; the same seed gives the same result.")(fn)


def dry_run_option(fn):
    return click.option("--dry-run", is_flag=True, help="Print the resolved settings as JSON and exit.")(fn)


def sampler_options(fn):
    fn = click.option("--karras", is_flag=True, help="Karras sigmas (where the sampler allows).")(fn)
    fn = click.option("--eta", type=click.FloatRange(0, 1), default=None,
                      help="DDIM noise: 0 deterministic, 1 DDPM-like (ddim only).")(fn)
    fn = click.option("--spacing", type=SPACING_CHOICE, default="trailing", show_default=True,
                      help="Timestep spacing: diffusers' leading/trailing/linspace, or logsnr (uniform in log-SNR).")(fn)
    fn = click.option("--steps", type=click.IntRange(1, 10_000), default=20, show_default=True,
                      help="Sampler steps.")(fn)
    fn = click.option("--sampler", type=SAMPLER_CHOICE, default="dpmpp_2m", show_default=True,
                      help="Sampler from the registry.")(fn)
    return fn


def _sampler_kwargs(spacing, eta, karras):
    kw = {"timestep_spacing": spacing}
    if eta is not None:
        kw["eta"] = eta
    if karras:
        kw["use_karras_sigmas"] = True
    return kw


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dump(settings: dict) -> None:
    click.echo(json.dumps(settings, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="diffusekit")
def main():
    """diffusekit: train diffusion models on your images, sample fast, edit with guidance."""


# --- train -------------------------------------------------------------------------------------
@main.command()
@click.option("--data", "source", default="digits", show_default=True,
              help="'digits' (built in), an image folder, an MNIST-format IDX file or folder, or a .npy/.npz file.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory to write.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A full run config JSON (e.g. another run's config.json); flags below override it.")
@click.option("--image-size", type=click.IntRange(0), default=None, help="Resize/crop images to this size (0 = native).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Image channels (default 1).")
@click.option("--split", type=click.Choice(["train", "t10k"]), default=None, help="IDX split.")
@click.option("--unconditional", is_flag=True, help="Ignore class labels (no class conditioning).")
@click.option("--preset", default=None, help="UNet preset (tiny8, small16, mnist28, cifar32, 64); default by image size.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Global batch size.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "sample", "v_prediction"]), default=None)
@click.option("--schedule", "schedule_kind", type=click.Choice(["linear", "scaled_linear", "cosine", "sigmoid"]),
              default=None, help="Noise schedule.")
@click.option("--loss-weighting", type=click.Choice(["none", "min_snr"]), default=None)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16"]), default=None, help="bf16 autocast.")
@click.option("--channels-last", is_flag=True, default=None, help="channels_last memory format.")
@click.option("--class-dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of null labels, for classifier-free guidance.")
@click.option("--sample-every", type=click.IntRange(0), default=None, help="Write a sample grid every N steps.")
@click.option("--save-every", type=click.IntRange(1), default=None, help="Checkpoint every N steps.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@seed_option
@dry_run_option
@friendly_errors
def train(source, out, config_path, image_size, channels, split, unconditional, preset, steps, batch_size, lr,
          prediction_type, schedule_kind, loss_weighting, mixed_precision, channels_last, class_dropout,
          sample_every, save_every, device, resume, seed, dry_run):
    """Train a diffusion model and write a run directory.

    \b
    Example (about 5 minutes on a 2-core CPU; writes runs/digits/samples/*.png):
      diffusekit train --data digits --out runs/digits
      diffusekit train --data ../shared/data/mnist --out runs/mnist --mixed-precision bf16
    """
    from dataclasses import replace

    from .data import DataConfig, load_dataset
    from .nn.unet import UNetConfig
    from .train import RunConfig, default_run_config, train as run_training

    if resume and config_path is None and (Path(out) / "config.json").exists():
        config_path = str(Path(out) / "config.json")
    if config_path:
        cfg = RunConfig.from_json(config_path)
        data_cfg = cfg.data
    else:
        data_cfg = DataConfig(source=source)
    data_over = {k: v for k, v in dict(image_size=image_size, channels=int(channels) if channels else None,
                                       split=split).items() if v is not None}
    if unconditional:
        data_over["class_labels"] = False
    data_cfg = replace(data_cfg, **data_over)
    if not config_path:
        dataset = load_dataset(data_cfg)
        for note in getattr(dataset, "notes", []):
            click.echo(f"data: {note}", err=True)
        cfg = default_run_config(data_cfg, dataset)
    else:
        cfg = replace(cfg, data=data_cfg)
    if preset:
        cfg = replace(cfg, model=UNetConfig.preset(preset, image_size=cfg.model.image_size,
                                                   in_channels=cfg.model.in_channels,
                                                   num_classes=cfg.model.num_classes))
    train_over = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, prediction_type=prediction_type,
                                        loss_weighting=loss_weighting, mixed_precision=mixed_precision,
                                        channels_last=channels_last, class_dropout=class_dropout,
                                        sample_every=sample_every, save_every=save_every, device=device,
                                        seed=seed).items() if v is not None}
    cfg = replace(cfg, train=replace(cfg.train, **train_over))
    if schedule_kind:
        cfg = replace(cfg, schedule=replace(cfg.schedule, kind=schedule_kind))
    cfg = type(cfg).from_dict(cfg.to_dict())  # re-validate the combination
    if dry_run:
        _dump(cfg.to_dict())
        return
    result = run_training(cfg, out, resume=resume, progress=True)
    click.echo(f"trained {result.step} steps in {result.seconds:.0f} s (final loss {result.loss:.4f}); "
               f"run directory: {result.run_dir}")


# --- sample ------------------------------------------------------------------------------------
def _load_pipeline(run, precision="fp32"):
    from .pipeline import Pipeline
    return Pipeline.load(run, precision=precision)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@sampler_options
@click.option("--n", "n", type=click.IntRange(1), default=64, help="Number of images.")
@click.option("--class", "class_label", default=None,
              help="Class index or name (class-conditional runs); 'each' gives one class per grid column.")
@click.option("--guidance", type=float, default=1.0, help="Classifier-free guidance scale w (1 = none).")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", help="Grid image to write.")
@click.option("--nrow", type=click.IntRange(1), default=None, help="Images per grid row.")
@click.option("--trajectory", type=click.Path(dir_okay=False), default=None,
              help="Also draw x_t and predicted x0 along the way for a few images.")
@click.option("--batch-size", type=click.IntRange(1), default=256)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32")
@seed_option
@dry_run_option
@friendly_errors
def sample(run, sampler, steps, spacing, eta, karras, n, class_label, guidance, out, nrow, trajectory,
           batch_size, precision, seed, dry_run):
    """Sample images from a trained run and save a grid.

    \b
    Example:
      diffusekit sample runs/digits --sampler dpmpp_2m --steps 20 --n 64 --seed 0 --out grid.png
      diffusekit sample runs/digits --class 3 --guidance 2 --trajectory strip.png
    """
    from .viz import save_grid, save_trajectory
    settings = dict(run=run, sampler=sampler, steps=steps, n=n, class_label=class_label, guidance=guidance,
                    seed=seed, out=out, **_sampler_kwargs(spacing, eta, karras))
    if dry_run:
        _dump(settings)
        return
    pipe = _load_pipeline(run, precision)
    label = _parse_class(class_label)
    if label == "each":
        if not pipe.num_classes:
            raise click.ClickException("--class each needs a class-conditional run; this one has no classes.")
        # image k gets class k mod K, so a grid with K images per row shows one class per column
        label = torch.arange(n) % pipe.num_classes
        nrow = nrow or pipe.num_classes
    kw = _sampler_kwargs(spacing, eta, karras)
    start = time.perf_counter()
    images = pipe.sample(n, sampler=sampler, num_steps=steps, generator=_generator(seed), class_labels=label,
                         guidance_scale=guidance, batch_size=batch_size, progress=True, **kw)
    seconds = time.perf_counter() - start
    save_grid(images, out, nrow=nrow)
    nfe = pipe.sampler_for(sampler, **kw).nfe(steps)
    click.echo(f"wrote {out}: {n} images, {sampler} with {steps} steps ({nfe} model evaluations), {seconds:.1f} s")
    if trajectory:
        k = min(n, 4)
        traj_labels = label[:k] if isinstance(label, torch.Tensor) else label
        _, xs, x0s, ts = pipe.trajectory(k, sampler, steps, _generator(seed), traj_labels, guidance)
        save_trajectory(xs, x0s, trajectory, timesteps=ts)
        click.echo(f"wrote {trajectory}: x_t (top) and predicted x0 (bottom) along {steps} steps")


def _parse_class(value):
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value  # a class name; the pipeline checks it


# --- editing -----------------------------------------------------------------------------------
def _load_input_image(pipe, path):
    from .data import load_image
    c, h, _ = pipe.image_shape
    return load_image(path, image_size=h, channels=c)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--strength", type=click.FloatRange(0, 1), default=0.5,
              help="How far to noise the input: 0 returns it, 1 samples afresh.")
@sampler_options
@click.option("--class", "class_label", default=None, help="Edit toward this class.")
@click.option("--guidance", type=float, default=1.0, help="Classifier-free guidance scale.")
@click.option("--out", type=click.Path(dir_okay=False), default="edited.png")
@seed_option
@dry_run_option
@friendly_errors
def edit(run, image, strength, sampler, steps, spacing, eta, karras, class_label, guidance, out, seed, dry_run):
    """SDEdit: noise an image to t = strength * T and denoise it with any sampler.

    \b
    Example:
      diffusekit edit runs/digits --image in.png --strength 0.6 --class 7 --out edited.png
    """
    if dry_run:
        _dump(dict(run=run, image=image, strength=strength, sampler=sampler, steps=steps, class_label=class_label,
                   guidance=guidance, seed=seed, out=out))
        return
    from .data import save_image
    pipe = _load_pipeline(run)
    x = _load_input_image(pipe, image)
    y = pipe.edit(x, strength, sampler, steps, _generator(seed), _parse_class(class_label), guidance,
                  **_sampler_kwargs(spacing, eta, karras))
    save_image(y, out)
    click.echo(f"wrote {out} (strength {strength}, {sampler}, {steps} steps)")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--steps", type=click.IntRange(1, 10_000), default=50, help="DDIM steps.")
@click.option("--refine", type=click.IntRange(0, 100), default=3,
              help="Fixed-point refinements per inversion step (0 = plain inversion).")
@click.option("--class", "class_label", default=None, help="Class the image is inverted under.")
@click.option("--edit-class", default=None, help="Also re-sample the inverted noise under this class.")
@click.option("--guidance", type=float, default=1.0, help="Guidance scale for --edit-class.")
@click.option("--out", type=click.Path(file_okay=False), default="inversion", help="Folder to write.")
@seed_option
@dry_run_option
@friendly_errors
def invert(run, image, steps, refine, class_label, edit_class, guidance, out, seed, dry_run):
    """DDIM inversion: find the x_T that DDIM maps back to the image; report reconstruction PSNR.

    \b
    Writes OUT/noise.safetensors, OUT/reconstruction.png (and OUT/edited.png with --edit-class).
    Example:
      diffusekit invert runs/digits --image in.png --steps 50 --refine 3 --edit-class 8
    """
    if dry_run:
        _dump(dict(run=run, image=image, steps=steps, refine=refine, class_label=class_label,
                   edit_class=edit_class, guidance=guidance, out=out, seed=seed))
        return
    from safetensors.torch import save_file

    from .data import save_image
    from .editing import psnr
    pipe = _load_pipeline(run)
    x = _load_input_image(pipe, image)
    label = _parse_class(class_label)
    x_T = pipe.invert(x, steps, refine, label)
    recon = pipe.reconstruct(x_T, steps, label)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    save_file({"x_T": x_T.contiguous().cpu()}, str(outdir / "noise.safetensors"),
              metadata={"steps": str(steps), "refine": str(refine), "image": str(image)})
    save_image(recon.clamp(-1, 1), outdir / "reconstruction.png")
    click.echo(f"reconstruction PSNR {psnr(recon, x.cpu()):.2f} dB ({steps} steps, refine {refine}); "
               f"wrote {outdir}/noise.safetensors and reconstruction.png")
    if edit_class is not None:
        edited = pipe.reconstruct(x_T, steps, _parse_class(edit_class), guidance)
        save_image(edited.clamp(-1, 1), outdir / "edited.png")
        click.echo(f"wrote {outdir}/edited.png (re-sampled under class {edit_class})")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Mask image: white (1) = fill, black (0) = keep; same size as the image.")
@sampler_options
@click.option("--resample", type=click.IntRange(1, 50), default=1, help="RePaint resampling jumps per step.")
@click.option("--class", "class_label", default=None, help="Fill toward this class.")
@click.option("--out", type=click.Path(dir_okay=False), default="inpainted.png")
@seed_option
@dry_run_option
@friendly_errors
def inpaint(run, image, mask, sampler, steps, spacing, eta, karras, resample, class_label, out, seed, dry_run):
    """Fill the masked region of an image; the pixels outside the mask are kept exactly.

    \b
    Example:
      diffusekit inpaint runs/digits --image in.png --mask lower_half.png --resample 3
    """
    if dry_run:
        _dump(dict(run=run, image=image, mask=mask, sampler=sampler, steps=steps, resample=resample,
                   class_label=class_label, seed=seed, out=out))
        return
    from .data import read_image_array, save_image
    pipe = _load_pipeline(run)
    x = _load_input_image(pipe, image)
    m = torch.from_numpy(read_image_array(mask)).float().mean(-1)  # (H, W) in [0, 1]
    if tuple(m.shape) != tuple(x.shape[-2:]):
        raise click.ClickException(f"the mask is {m.shape[1]}x{m.shape[0]} but the image (at the model's size) is "
                                   f"{x.shape[-1]}x{x.shape[-2]}; draw the mask at {x.shape[-1]}x{x.shape[-2]}.")
    m = (m > 0.5).float()[None, None]
    y = pipe.inpaint(x, m, sampler, steps, _generator(seed), resample, _parse_class(class_label),
                     **_sampler_kwargs(spacing, eta, karras))
    save_image(y.clamp(-1, 1), out)
    click.echo(f"wrote {out} ({int(m.sum())} pixels filled, {sampler}, {steps} steps, resample {resample})")


# --- pictures ----------------------------------------------------------------------------------
@main.command("plot-schedule")
@click.option("--out", type=click.Path(dir_okay=False), default="schedule.png", help="Image to write.")
@click.option("--timesteps", type=click.IntRange(2, 100_000), default=1000, help="Training timesteps T.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image for the noising strip (default: a built-in digit).")
@seed_option
@dry_run_option
@friendly_errors
def plot_schedule(out, timesteps, image, seed, dry_run):
    """Plot beta_t, alpha_t, abar_t, sqrt(abar_t), sqrt(1 - abar_t) for linear and cosine schedules,
    and one image noised at several t.

    \b
    Example:
      diffusekit plot-schedule --out schedule.png
    """
    if dry_run:
        _dump(dict(out=out, timesteps=timesteps, image=image, seed=seed))
        return
    from .data import DataConfig, load_dataset, load_image
    from .schedule import NoiseSchedule
    from .viz import plot_schedule as draw
    scheds = {"linear": NoiseSchedule.create("linear", timesteps),
              "cosine": NoiseSchedule.create("cosine", timesteps)}
    img = load_image(image, channels=3) if image else load_dataset(DataConfig("digits", image_size=32)).images[0:1]
    T = timesteps
    ts = sorted({0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1})
    draw(scheds, out, image=img, ts=ts, seed=seed)
    click.echo(f"wrote {out}")



# --- classifier and evaluation -----------------------------------------------------------------
@main.command("train-classifier")
@click.option("--data", "source", default="digits", show_default=True,
              help="Labelled data: 'digits', an image folder with class sub-folders, an MNIST-format IDX "
                   "folder or file, or a .npy/.npz file with labels.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--image-size", type=click.IntRange(0), default=0, show_default=True,
              help="Resize/crop images to this size (0 = native); match the diffusion run's size.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="1", show_default=True, help="Image channels.")
@click.option("--noise-aware", is_flag=True,
              help="Train on noised x_t at random t (for classifier guidance) instead of clean images.")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Take the noise schedule (and image size/channels) from this diffusion run.")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-3, show_default=True,
              help="Peak learning rate.")
@click.option("--base-channels", type=click.IntRange(1), default=16, show_default=True, help="Classifier width.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@seed_option
@dry_run_option
@friendly_errors
def train_classifier(source, out, image_size, channels, noise_aware, run_dir, steps, batch_size, lr,
                     base_channels, device, seed, dry_run):
    """Train a classifier: a judge for `eval --features classifier:OUT`, or (--noise-aware) a guide.

    Writes OUT/config.json, OUT/classifier.safetensors and OUT/metrics.json (held-out accuracy on
    the IDX t10k split, otherwise on a seeded 10% of the data).

    \b
    Example (an MNIST judge, ~99% test accuracy in a few CPU minutes):
      diffusekit train-classifier --data ../shared/data/mnist --out runs/judge
      diffusekit train-classifier --data digits --run runs/digits --noise-aware --out runs/guide
    """
    from .classifier_train import ClassifierTrainConfig, default_classifier_config, train_classifier as fit
    from .data import DataConfig, load_dataset
    from .schedule import ScheduleConfig

    schedule = ScheduleConfig()
    channels = int(channels)
    if run_dir:
        from .train import read_run_config
        run_cfg = read_run_config(run_dir)
        schedule, image_size, channels = run_cfg.schedule, run_cfg.model.image_size, run_cfg.model.in_channels
    data_cfg = DataConfig(source=source, image_size=image_size, channels=channels)
    train_cfg = ClassifierTrainConfig(steps=steps, batch_size=batch_size, lr=lr, noise_aware=noise_aware,
                                      schedule=schedule, seed=seed, device=device)
    dataset = load_dataset(data_cfg)
    if dataset.labels is None:
        raise click.ClickException(f"{source} has no labels; a classifier needs class sub-folders, IDX labels "
                                   f"or 'labels' in the .npz.")
    classifier_cfg = default_classifier_config(dataset.image_size, dataset.channels, dataset.num_classes,
                                               base_channels=base_channels, groups=min(8, base_channels))
    if dry_run:
        _dump({"classifier": classifier_cfg.to_dict(), "data": data_cfg.to_dict(), "train": train_cfg.to_dict()})
        return
    result = fit(data_cfg, out, classifier_cfg, train_cfg, progress=True)
    click.echo(f"trained {steps} steps in {result.seconds:.0f} s; held-out accuracy {result.accuracy:.4f} "
               f"({result.metrics['heldout']}); wrote {out}/classifier.safetensors")


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--ref", "ref_source", default="digits", show_default=True,
              help="Reference data (as --data of train), brought to the run's image size and channels.")
@click.option("--ref-split", type=click.Choice(["train", "t10k"]), default="train", show_default=True,
              help="IDX split of the reference data.")
@click.option("--n", "n", type=click.IntRange(2), default=5000, show_default=True, help="Samples to generate.")
@sampler_options
@click.option("--features", default="raw", show_default=True,
              help="'raw' (pixels), 'classifier:PATH' (a train-classifier folder) or 'inception:WEIGHTS' "
                   "(pt_inception-2015-12-05-6726825d.pth, for FID).")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--classes", type=click.Choice(["uniform", "none"]), default="uniform", show_default=True,
              help="Class-conditional runs: balanced labels, or none (unconditional).")
@click.option("--batch-size", type=click.IntRange(1), default=250, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".cache/diffusekit", show_default=True,
              help="Where reference statistics are cached.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON here.")
@seed_option
@dry_run_option
@friendly_errors
def eval_run(run, ref_source, ref_split, n, sampler, steps, spacing, eta, karras, features, guidance, classes,
             batch_size, cache_dir, out, seed, dry_run):
    """Score a run's samples: Frechet distance, KID, precision/recall, NFE and time.

    \b
    Example:
      diffusekit eval runs/mnist --ref ../shared/data/mnist --ref-split t10k --n 5000 \
        --sampler dpmpp_2m --steps 20 --features classifier:runs/judge --out eval.json
    """
    from .data import DataConfig
    from .evaluation import evaluate_run
    from .train import read_run_config
    model_cfg = read_run_config(run).model
    ref = DataConfig(source=ref_source, split=ref_split, image_size=model_cfg.image_size,
                     channels=model_cfg.in_channels)
    kw = _sampler_kwargs(spacing, eta, karras)
    settings = dict(run=run, ref=ref.to_dict(), n=n, sampler=sampler, steps=steps, features=features,
                    guidance=guidance, classes=classes, batch_size=batch_size, cache_dir=cache_dir, seed=seed,
                    out=out, **kw)
    if dry_run:
        _dump(settings)
        return
    pipe = _load_pipeline(run)
    result = evaluate_run(pipe, ref, n, sampler, steps, features, cache_dir, seed, batch_size, guidance,
                          "uniform" if classes == "uniform" else None, progress=True, **kw)
    width = max(len(k) for k in result)
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if out:
        from .checkpoint import write_text_atomic
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({**result, "settings": settings}, indent=2) + "\n")
        click.echo(f"wrote {out}")

if __name__ == "__main__":
    sys.exit(main())
