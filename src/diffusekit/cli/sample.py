"""`sample`, `edit`, `inpaint`, `invert`: a run (or a diffusers folder) in, pictures out."""
from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from . import conditioning as cond
from . import options as opt
from .app import main
from .options import UserError, friendly_errors


def _prompts(prompts_file, prompt, n: int, nrow):
    """--prompts-file: (prompts, one per image; images; images per row; the row labels) or the inputs as given."""
    if not prompts_file:
        return prompt, n, nrow, None
    if prompt is not None:
        raise UserError(f"--prompt {prompt!r} and --prompts-file {prompts_file} both give the prompts; give one "
                        f"(add the prompt as a line of the file).")
    rows = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
    if not rows:
        raise UserError(f"--prompts-file {prompts_file} holds no prompts; write one prompt per line.")
    return [p for p in rows for _ in range(n)], n * len(rows), n, rows


def _write_grid(images, out, nrow, row_labels) -> None:
    from ..viz import save_grid, save_labelled_grid
    if row_labels:
        save_labelled_grid(images, out, nrow=nrow, row_labels=row_labels)
    else:
        save_grid(images, out, nrow=nrow)


def _trajectory(pipe, path, n, sampler, steps, seed, label, prompt, kw) -> None:
    from ..viz import save_trajectory
    k = min(n, 4)
    labels = label[:k] if isinstance(label, torch.Tensor) else label
    prompts = prompt[:k] if isinstance(prompt, list) else prompt
    _, xs, x0s, ts = pipe.trajectory(k, sampler, steps, opt.generator(seed), labels, prompt=prompts, **kw)
    save_trajectory(xs, x0s, path, timesteps=ts)
    click.echo(f"wrote {path}: x_t (top) and predicted x0 (bottom) along {steps} steps")


def _fast_paths(pipe, compile_: str, cuda_graphs: str, steps: int, n: int, batch_size: int, guidance: float) -> None:
    """--compile and --cuda-graphs for n images in batches of batch_size, steps calls each (CFG: 2 branches)."""
    per_call = 2 if guidance != 1.0 else 1
    pipe.compile(compile_, calls=steps * -(-n // batch_size) * per_call, batch_size=min(n, batch_size) * per_call)
    pipe.use_cuda_graphs(cuda_graphs)


@main.command()
@opt.run_argument
@opt.sampler_options
@cond.guidance_options
@click.option("--n", "n", type=click.IntRange(1, 100_000), default=64,
              help="Number of images (per prompt with --prompts-file).")
@cond.class_option("Class index or name; 'each' gives one class per grid column.")
@cond.prompt_options
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One prompt per line; the grid gets one row per prompt, labelled with it.")
@opt.timesteps_option
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
@opt.adapter_options
@opt.network_options
@friendly_errors
def sample(run, sampler, steps, spacing, eta, karras, variance_type, guidance, guides, guide_weighting, guide_window,
           classifier_path, classifier_scale, n, class_label, prompt, negative_prompt, prompts_file, timesteps_file,
           out, nrow, trajectory, batch_size, compile_, cuda_graphs, lora_scale, base, seed, dry_run, device, precision):
    """Sample images from a trained run (or a diffusers pipeline folder) and save a grid.

    \b
    Example:
      diffusekit sample runs/digits --sampler dpmpp_2m --steps 20 --n 64 --seed 0 --out grid.png
      diffusekit sample runs/digits --class 3 --guidance 2 --trajectory strip.png
      diffusekit sample runs/digits --guide brightness=0.9 --out bright.png
      diffusekit sample runs/shapes --prompt "a large red circle on the left" --guidance 4 --n 16
      diffusekit sample runs/ft --prompt "a sks emoji" --lora-scale 0.5     (a LoRA fine-tune)
    """
    kw = opt.sampler_kwargs(spacing, eta, karras, variance_type)
    if dry_run:
        opt.dump(dict(run=run, sampler=sampler or "default", steps=steps or 20, n=n, class_label=class_label, guidance=guidance,
                      guides=list(guides), guide_weighting=guide_weighting, classifier=classifier_path,
                      prompt=prompt, negative_prompt=negative_prompt, prompts_file=prompts_file,
                      seed=seed or 0, out=out, device=device, precision=precision or "auto", lora_scale=lora_scale,
                      base=base, **kw))
        return
    pipe = opt.load_pipeline(run, device, precision, base, lora_scale)
    label, target = cond.labels(pipe, class_label, classifier_path, each_of=n)
    nrow = nrow or (pipe.num_classes if class_label == "each" else None)
    guide_kw = {**cond.guidance_kwargs(pipe, guidance, guides, guide_weighting, guide_window, classifier_path,
                                       classifier_scale, target), "negative_prompt": negative_prompt}
    name = opt.resolve_sampler(pipe, sampler)
    steps, tuned = opt.steps_plan(run, pipe, name, steps, timesteps_file, guidance)
    kw.update({"timesteps": tuned} if tuned is not None else {})
    prompt, n, nrow, rows = _prompts(prompts_file, prompt, n, nrow)
    _fast_paths(pipe, compile_, cuda_graphs, steps, n, batch_size, guidance)
    start = time.perf_counter()
    with opt.quiet_notes():
        images = pipe.sample(n, sampler=sampler, num_steps=steps, generator=opt.generator(seed), class_labels=label,
                             batch_size=batch_size, progress=True, prompt=prompt, **guide_kw, **kw)
    seconds = time.perf_counter() - start
    _write_grid(images, out, nrow, rows)
    plain = {k: v for k, v in kw.items() if k not in ("timesteps", "timestep_spacing")}
    nfe = pipe.resolve_sampler(sampler, kw.get("timestep_spacing"), **plain).nfe(steps, tuned)
    calls = f"{nfe} model evaluations" + (", each conditional + unconditional" if guidance != 1.0 else "")
    click.echo(f"wrote {out}: {n} images, {name} with {steps} steps ({calls}), {seconds:.1f} s")
    if trajectory:
        with opt.quiet_notes():
            _trajectory(pipe, trajectory, n, sampler, steps, seed, label, prompt, {**guide_kw, **kw})


@main.command()
@opt.run_argument
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--strength", type=click.FloatRange(0, 1), default=0.5,
              help="How far to noise the input: 0 returns it, 1 samples afresh.")
@opt.sampler_options
@cond.guidance_options
@cond.class_option("Edit toward this class.")
@cond.prompt_options
@click.option("--out", type=click.Path(dir_okay=False), default="edited.png", help="Image to write.")
@opt.adapter_options
@opt.network_options
@friendly_errors
def edit(run, image, strength, sampler, steps, spacing, eta, karras, variance_type, guidance, guides,
         guide_weighting, guide_window, classifier_path, classifier_scale, class_label, prompt, negative_prompt, out,
         lora_scale, base, seed, dry_run, device, precision):
    """SDEdit: noise an image to t = strength * T and denoise it with any sampler.

    \b
    Example:
      diffusekit edit runs/digits --image in.png --strength 0.6 --class 7 --out edited.png
      diffusekit edit runs/shapes --image in.png --prompt "a small blue square at the top" --strength 0.6
    """
    steps = steps or 20
    if dry_run:
        opt.dump(dict(run=run, image=image, strength=strength, sampler=sampler, steps=steps, class_label=class_label,
                      guidance=guidance, guides=list(guides), seed=seed or 0, out=out, device=device))
        return
    from ..data import save_image
    pipe = opt.load_pipeline(run, device, precision, base, lora_scale)
    label, target = cond.labels(pipe, class_label, classifier_path)
    name = opt.resolve_sampler(pipe, sampler)
    with opt.quiet_notes():
        y = pipe.edit(pipe.load_image(image), strength, sampler, steps, opt.generator(seed), label, prompt=prompt,
                      negative_prompt=negative_prompt,
                      **cond.guidance_kwargs(pipe, guidance, guides, guide_weighting, guide_window, classifier_path,
                                             classifier_scale, target),
                      **opt.sampler_kwargs(spacing, eta, karras, variance_type))
    save_image(y, out)
    click.echo(f"wrote {out} (strength {strength}, {name}, {steps} steps)")


@main.command()
@opt.run_argument
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Mask image: white = fill, black = keep; the model's size.")
@opt.sampler_options
@cond.guidance_options
@click.option("--resample", type=click.IntRange(1, 50), default=1, help="RePaint resampling jumps per step.")
@cond.class_option("Fill toward this class.")
@click.option("--out", type=click.Path(dir_okay=False), default="inpainted.png", help="Image to write.")
@opt.adapter_options
@opt.network_options
@friendly_errors
def inpaint(run, image, mask, sampler, steps, spacing, eta, karras, variance_type, guidance, guides, guide_weighting,
            guide_window, classifier_path, classifier_scale, resample, class_label, out, lora_scale, base, seed, dry_run,
            device, precision):
    """Fill the masked region of an image; the pixels outside the mask are kept exactly.

    \b
    Example:
      diffusekit inpaint runs/digits --image in.png --mask lower_half.png --resample 3
    """
    steps = steps or 20
    if dry_run:
        opt.dump(dict(run=run, image=image, mask=mask, sampler=sampler, steps=steps, resample=resample,
                      class_label=class_label, seed=seed or 0, out=out, device=device))
        return
    from ..data import save_image
    pipe = opt.load_pipeline(run, device, precision, base, lora_scale)
    x, m = pipe.load_image(image), pipe.load_mask(mask)
    label, target = cond.labels(pipe, class_label, classifier_path)
    sampler = pipe.inpaint_sampler(sampler)
    name = opt.resolve_sampler(pipe, sampler)
    with opt.quiet_notes():
        y = pipe.inpaint(x, m, sampler, steps, opt.generator(seed), resample, label,
                         **cond.guidance_kwargs(pipe, guidance, guides, guide_weighting, guide_window, classifier_path,
                                                classifier_scale, target),
                         **opt.sampler_kwargs(spacing, eta, karras, variance_type))
    save_image(y.clamp(-1, 1), out)
    click.echo(f"wrote {out} ({int(m.sum())} pixels filled, {name}, {steps} steps, resample {resample})")


@main.command()
@opt.run_argument
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Input image.")
@click.option("--steps", type=click.IntRange(1, 10_000), default=50, help="DDIM steps.")
@click.option("--refine", type=click.IntRange(0, 100), default=3,
              help="Fixed-point refinements per inversion step (0 = plain inversion).")
@cond.class_option("Class the image is inverted under.")
@click.option("--edit-class", default=None, help="Also re-sample the inverted noise under this class.")
@click.option("--guidance", type=float, default=1.0, help="Classifier-free guidance scale for --edit-class.")
@click.option("--out", type=click.Path(file_okay=False), default="inversion", help="Folder to write.")
@opt.dry_run
@opt.device
@opt.precision
@friendly_errors
def invert(run, image, steps, refine, class_label, edit_class, guidance, out, dry_run, device, precision):
    """DDIM inversion: find the x_T that DDIM maps back to the image; report reconstruction PSNR.

    Deterministic (DDIM with eta = 0 both ways), so it takes no seed. Writes OUT/noise.safetensors,
    OUT/reconstruction.png (and OUT/edited.png with --edit-class).

    \b
    Example:
      diffusekit invert runs/digits --image in.png --steps 50 --refine 3 --edit-class 8
    """
    if dry_run:
        opt.dump(dict(run=run, image=image, steps=steps, refine=refine, class_label=class_label,
                      edit_class=edit_class, guidance=guidance, out=out, device=device))
        return
    from ..store import write_weights_atomic
    from ..data import save_image
    from ..metrics import psnr
    pipe = opt.load_pipeline(run, device, precision)
    x, label, folder = pipe.load_image(image), cond.parse_class(class_label), Path(out)
    x_T = pipe.invert(x, steps, refine, label)
    recon = pipe.reconstruct(x_T, steps, label)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights_atomic(folder / "noise.safetensors", {"x_T": x_T},
                         {"steps": str(steps), "refine": str(refine), "image": str(image)})
    save_image(recon.clamp(-1, 1), folder / "reconstruction.png")
    click.echo(f"reconstruction PSNR {psnr(recon, x.cpu()):.2f} dB ({steps} steps, refine {refine}); "
               f"wrote {folder}/noise.safetensors and reconstruction.png")
    if edit_class is not None:
        edited = pipe.reconstruct(x_T, steps, cond.parse_class(edit_class), guidance_scale=guidance)
        save_image(edited.clamp(-1, 1), folder / "edited.png")
        click.echo(f"wrote {folder}/edited.png (re-sampled under class {edit_class})")
