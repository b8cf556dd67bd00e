"""What steers a sample, as options: --class, --prompt, --guidance, --guide, --classifier.

These only parse: which conditioning a model accepts, and what guidance needs, the Pipeline checks
(Pipeline.class_labels, Pipeline.prompts, Pipeline.check_guidance).
"""
from __future__ import annotations

import click
import torch

from .options import UserError

# scales that visibly steer a small digits model at 20 DDIM steps (measured: a brightness guide at these
# scales moves the mean intensity by about +0.75 (source) and +0.13 (sqrt_abar at 10); see BENCHMARKS.md)
DEFAULT_GUIDE_SCALE = {"sqrt_abar": 30.0, "constant": 30.0, "one_minus_abar": 30.0, "source": 10.0}


def guidance_options(fn):
    """--guidance, --guide (gradient guides), their weighting and window, and classifier guidance."""
    from ..guidance import GUIDE_WEIGHTINGS
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
    return guidance_scale_option(fn)


def guidance_scale_option(fn):
    return click.option("--guidance", type=float, default=1.0, show_default=True,
                        help="Classifier-free guidance scale w (1 = none).")(fn)


def prompt_options(fn):
    fn = click.option("--negative-prompt", default="",
                      help="The unconditional prompt of text guidance (default: empty).")(fn)
    return click.option("--prompt", default=None, help="Text prompt (text-conditioned runs).")(fn)


def class_option(help_text: str):
    return click.option("--class", "class_label", default=None, help=help_text)


def parse_guide(spec: str, weighting: str, window):
    """'color=R,G,B[@scale]' or 'brightness=V[@scale]' (values in [0, 1]) -> a guidance.Guide."""
    from ..guidance import brightness_guide, color_guide
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


def parse_class(value):
    """--class: an index, a class name (the pipeline checks it), 'each' or None."""
    if value is None or value == "each":
        return value
    try:
        return int(value)
    except ValueError:
        return value


def labels(pipe, class_label, classifier_path, each_of: int | None = None):
    """(the model's class labels, the classifier's target) from --class.

    On an unconditional model with --classifier, --class is only the classifier's target. With each_of=n
    (sample's grid), 'each' gives image k the class k mod K, so a grid with K images per row shows one
    class per column."""
    label = parse_class(class_label)
    if label is not None and classifier_path and not pipe.num_classes:
        return None, label
    if label == "each" and each_of is not None:
        if not pipe.num_classes:
            raise UserError("--class each needs a class-conditional run; this one has no classes.")
        label = torch.arange(each_of) % pipe.num_classes
    return label, label


def guidance_kwargs(pipe, guidance, guides, guide_weighting, guide_window, classifier_path, classifier_scale,
                    target) -> dict:
    """Keyword arguments for Pipeline.sample/edit/inpaint from the guidance options."""
    pipe.check_guidance(guidance, target)          # before any work: the model can be guided so
    kw = {"guidance_scale": guidance, "guides": [parse_guide(g, guide_weighting, guide_window) for g in guides]}
    if classifier_path:
        from ..store.classifier import load_classifier
        if target is None or isinstance(target, str) and target == "each":
            raise UserError("--classifier needs a target: pass --class N (the class to guide toward).")
        clf, _ = load_classifier(classifier_path, device=pipe.device)
        kw.update(classifier=clf, classifier_scale=classifier_scale, target_class=torch.as_tensor(target))
    return kw
