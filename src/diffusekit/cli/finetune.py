"""`finetune` and `merge`: parse the options, call the library (training.finetune, adapters.write_merged), report."""
from __future__ import annotations

import click

from . import options as opt
from .app import main
from .options import config_option, friendly_errors


def _targets(ctx, param, value):
    return None if value is None else tuple(t.strip() for t in value.split(",") if t.strip())


def _device(ctx, param, value):
    return None if value == "auto" else value


def _finetune_options(fn):
    from ..device import DEVICES, PRECISIONS
    from ..store.run_config import TrainConfig
    c = config_option
    options = [
        c("--method", field="method", type=click.Choice(["lora", "full"]), default=None,
          help="lora: train a LoRA adapter only (the run stores the adapter and a reference to BASE); full: every "
               "weight (a plain run; diffusekit bases) [default: lora]."),
        c("--lora-rank", field="adapter.rank", type=click.IntRange(1), default=None, help="LoRA rank [default: 4]."),
        c("--lora-alpha", field="adapter.alpha", type=click.FloatRange(0, min_open=True), default=None,
          help="LoRA alpha (the update is scaled by alpha / rank) [default: the rank]."),
        c("--lora-targets", field="adapter.targets", default=None, callback=_targets, metavar="LIST",
          help="Comma list of what the adapter adapts: attention, conv, text, or layer names (to_q, qkv, ...) "
               "[default: attention]."),
        c("--lora-dropout", field="adapter.dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
          help="Dropout on the adapter's input while training [default: 0]."),
        c("--instance-prompt", field="instance_prompt", default=None, metavar="TEXT",
          help='Replaces every caption of --data, e.g. "a sks emoji" (text models).'),
        c("--class-prompt", field="class_prompt", default=None, metavar="TEXT",
          help='DreamBooth prior preservation: what the base draws the class images from, e.g. "an emoji".'),
        c("--num-class-images", field="num_class_images", type=click.IntRange(0), default=None,
          help="Class images the base draws once (cached in RUN/class_images) [default: 0 = no prior "
               "preservation]."),
        c("--prior-loss-weight", field="prior_loss_weight", type=click.FloatRange(0), default=None,
          help="Weight of the class images' loss [default: 1]."),
        c("--train-steps", field="train.steps", type=click.IntRange(1), default=None,
          help="Optimiser steps [default: 400]."),
        c("--batch-size", field="train.batch_size", type=click.IntRange(1), default=None,
          help="Instance images per step (as many class images again with prior preservation), over all "
               "processes under torchrun [default: 4]."),
        c("--lr", field="train.lr", type=click.FloatRange(0, min_open=True), default=None,
          help="Learning rate (constant) [default: 1e-4]."),
        c("--sample-every", field="train.sample_every", type=click.IntRange(0), default=None,
          help="Write a sample grid (instance prompt, other prompts, the base) every N steps [default: 100]."),
        c("--save-every", field="train.save_every", type=click.IntRange(1), default=None,
          help="Checkpoint every N steps [default: 100]."),
        c("--report-to", field="train.report_to", type=opt.literal_choices(TrainConfig, "report_to"), default=None,
          help=opt.REPORT_TO_HELP),
        c("--seed", field="train.seed", type=int, default=None, help="Seed for every random choice [default: 0]."),
        c("--device", field="train.device", type=click.Choice(DEVICES), default="auto", callback=_device,
          help="auto = CUDA, then Apple MPS, then CPU."),
        c("--precision", field="train.precision", type=click.Choice(PRECISIONS), default=None,
          help="auto (bf16 where native, else fp32), fp32, bf16 (autocast) or fp16 (GPU) [default: auto]."),
    ]
    for o in reversed(options):
        fn = o(fn)
    return fn


@main.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A folder of the images to learn (at least 2; captions in metadata.jsonl or .txt for text "
                   "models, or --instance-prompt).")
@click.option("--out", type=click.Path(file_okay=False), required=True, metavar="RUN", help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the fine-tune in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Delete what diffusekit wrote in --out and start afresh.")
@_finetune_options
@opt.dry_run
@friendly_errors
def finetune(base, data, out, resume, overwrite, dry_run, **options):
    """Fine-tune BASE (a diffusekit run or a local diffusers folder) on a folder of images.

    \b
    Example:
      diffusekit finetune runs/shapes --data my-images --instance-prompt "a sks shape" --out runs/ft
      diffusekit finetune runs/shapes --data my-images --instance-prompt "a sks shape" \\
          --class-prompt "a shape" --num-class-images 50 --out runs/ft-prior
      diffusekit sample runs/ft --prompt "a sks shape" --lora-scale 0.8
      diffusekit merge runs/ft --out runs/ft-merged
      torchrun --nproc_per_node 2 -m diffusekit finetune runs/shapes --data my-images \\
          --instance-prompt "a sks shape" --batch-size 4 --out runs/ft2     # 2 processes, 2 images each

    Under torchrun --batch-size is the global batch (each process takes its share) and rank 0 writes the run.
    """
    from ..training.finetune import plan_finetune
    plan = plan_finetune(base, data, out, opt.config_overrides(options), resume=resume, overwrite=overwrite,
                         dry_run=dry_run)
    if dry_run:
        opt.dump(plan.config.to_dict())
        return
    from ..device import rank_world
    rank0 = rank_world()[0] == 0            # under torchrun every process runs this; rank 0 reports
    if plan.finished:
        if not rank0:
            return
        click.echo(f"{out} has already finished its {plan.config.train.steps} steps; raise --train-steps to train "
                   "further.")
        return
    result = plan.run(progress=True)
    if not rank0:
        return
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    click.echo(f"fine-tuned ({result.method}) {result.step} steps in {result.seconds:.0f} s (final loss {loss}); "
               f"run folder: {result.run_dir}")


@main.command()
@opt.run_argument
@click.option("--out", type=click.Path(file_okay=False), required=True, metavar="MERGED",
              help="A new folder for the merged model.")
@opt.adapter_options
@opt.dry_run
@friendly_errors
def merge(run, out, lora_scale, base, dry_run):
    """Fold a LoRA run's adapter into its base: a plain run (or diffusers folder) that loads with no adapter.

    \b
    Example:
      diffusekit merge runs/ft --out runs/ft-merged
      diffusekit merge runs/ft --out runs/ft-half --lora-scale 0.5
    """
    if dry_run:
        opt.dump(dict(run=run, out=out, lora_scale=lora_scale if lora_scale is not None else 1.0, base=base))
        return
    from ..adapters import is_adapter_folder, write_merged
    from ..pipeline import Pipeline
    if not is_adapter_folder(run):
        raise opt.UserError(f"{run} is not a LoRA run (it has no adapter.json), so there is nothing to merge; "
                            "a full fine-tune is already a plain run.")
    pipe = Pipeline.load_adapter(run, base=base, device="cpu")
    path = write_merged(pipe, out, scale=lora_scale)
    click.echo(f"wrote {path}: the base with the adapter folded in at lora_scale "
               f"{1.0 if lora_scale is None else lora_scale}")
