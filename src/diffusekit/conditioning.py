"""What a Pipeline's model is conditioned and guided on, checked: class labels, prompts, negative prompts,
guidance keywords, the image an edit starts from; and the guided Denoiser they make.

Guidance is composed here, in one place (`guided`, which `Pipeline.denoiser` calls): classifier-free
guidance, any number of gradient guides and classifier guidance stack into one Denoiser that every
sampler and editor takes; guides with the source's post-step rule run as a per-step callback beside it
(`source_callback`). Plain functions of the pipeline (any object with its `model`, `num_classes`,
`class_names`, `has_text`, `image_shape`, `schedule`, `prediction_type`, `device` and `network()`);
`Pipeline.check_guidance`, `.class_labels`, `.prompts`, `.conditioning` and `.denoiser` call them. Every
refusal says what was wrong and how to fix it, before anything is sampled.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .config import ConfigError
from .guidance import Guide, SourceGuidance, guided_denoiser
from .samplers import Denoiser

# The keywords of sample / edit / inpaint that go to Pipeline.denoiser (the rest are the sampler's options).
GUIDANCE_KEYS = ("guidance_scale", "guides", "classifier", "classifier_scale", "target_class", "negative_prompt")


def split_guidance(kwargs: dict) -> tuple[dict, dict]:
    """(the guidance keywords, the sampler options) of a call's keyword arguments."""
    return ({k: v for k, v in kwargs.items() if k in GUIDANCE_KEYS},
            {k: v for k, v in kwargs.items() if k not in GUIDANCE_KEYS})


def refuse_source_guides(guides, what: str) -> None:
    """Refuse guides with the source's post-step rule where `what` (edit, inpaint) takes eps-space guides only."""
    if any(g.weighting == "source" for g in guides):
        raise ConfigError(f"{what} takes eps-space guides only; a guide with weighting='source' acts after "
                          f"each sampling step and is offered by sample. Use weighting='sqrt_abar'.")


def check_guidance(pipe, guidance_scale: float, class_labels=None, *, labels_known: bool = True) -> None:
    """Refuse classifier-free guidance pipe's model cannot do: scale != 1 needs a class- or text-conditional
    model, and a class-conditional one the class_labels to guide toward (unless labels_known=False)."""
    if guidance_scale == 1.0:
        return
    if not (pipe.num_classes or pipe.has_text):
        raise ConfigError(f"guidance_scale={guidance_scale} needs a class- or text-conditional model; this one "
                          "has neither. Use guidance_scale=1 (and gradient guides or a classifier instead).")
    if labels_known and pipe.num_classes and not pipe.has_text and class_labels is None:
        raise ConfigError(f"guidance_scale={guidance_scale:g} (--guidance) mixes the class-conditional and the "
                          "unconditional prediction, so it needs a class: pass class_labels (--class N, an index "
                          "or a class name, or --class each for one class per grid column).")


def check_negative_prompt(pipe, negative_prompt: str, guidance_scale: float) -> None:
    """A negative prompt is the unconditional branch of text guidance: refused where it would do nothing."""
    if not pipe.has_text:
        kind = "class-conditional" if pipe.num_classes else "unconditional"
        raise ConfigError(f"a negative prompt was given but this model is {kind} (not text-conditioned), so it "
                          "would be ignored; drop --negative-prompt (negative_prompt=...).")
    if guidance_scale == 1.0:
        raise ConfigError("a negative prompt was given at guidance_scale=1, where it has no effect (it is the "
                          "unconditional branch of classifier-free guidance); pass --guidance above 1 (e.g. 3), "
                          "or drop --negative-prompt.")
    check_words(pipe.model, [negative_prompt], "negative prompt")


def check_words(model, prompts: Sequence[str], what: str, stacklevel: int = 4) -> None:
    """Refuse words a learned text encoder never saw; warn about prompts cut to the encoder's length."""
    text = getattr(model, "text", None)
    text = getattr(model, "text_encoder", None) if text is None else text
    unknown = sorted({w for p in prompts for w in getattr(text, "unknown_words", lambda p: [])(p)})
    if unknown:
        raise ConfigError(f"the words {unknown} of the {what} never occur in this run's captions, so its learned "
                          f"text encoder cannot read them; rephrase with words from the training captions.")
    count, limit = getattr(text, "token_count", None), getattr(text, "max_length", None)
    if count is None or not limit:
        return
    long = [(p, n) for p in dict.fromkeys(prompts) if (n := count(p)) > limit]
    if long:
        p, n = long[0]
        warnings.warn(f"the {what} {p[:40]!r}{'...' if len(p) > 40 else ''} is {n} tokens long and the text "
                      f"encoder reads {limit}: the last {n - limit} tokens are ignored; shorten it to keep "
                      "them.", stacklevel=stacklevel)


def class_labels(pipe, labels, n: int) -> torch.Tensor | None:
    """Labels as a (n,) long tensor on pipe's device: None, one int (or class name) for all, or one per image."""
    if labels is None:
        return None
    if not pipe.num_classes and pipe.has_text:
        raise ConfigError("class labels were given but this model is text-conditioned (no classes); describe "
                          "the image with a prompt (--prompt) instead of --class.")
    if not pipe.num_classes:
        raise ConfigError("class labels were given but this model is unconditional (no classes); "
                          "drop --class, or train with labelled data.")
    if isinstance(labels, str):
        if labels not in pipe.class_names:
            raise ConfigError(f"class {labels!r} is not one of this run's classes {pipe.class_names}.")
        labels = pipe.class_names.index(labels)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ConfigError(f"got {labels.numel()} class labels for {n} images; give one label or one per image.")
    bad = labels[(labels < -1) | (labels >= pipe.num_classes)]
    if len(bad):
        raise ConfigError(f"class label {int(bad[0])} is out of range; this model has classes "
                          f"0..{pipe.num_classes - 1} (-1 = unconditional).")
    return labels.to(pipe.device)


def prompts(pipe, prompt, n: int, stacklevel: int = 4) -> list[str] | None:
    """Prompts as a list of n strings: None, one string for all, or one per image."""
    if prompt is None:
        return None
    if not pipe.has_text:
        raise ConfigError("a prompt was given but this model is not text-conditioned; drop --prompt, or train "
                          "with captions (diffusekit train --text learned ...).")
    listed = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(listed) != n or not all(isinstance(p, str) for p in listed):
        raise ConfigError(f"got {len(listed)} prompts for {n} images; give one prompt or one per image.")
    check_words(pipe.model, listed, "prompt", stacklevel=stacklevel)
    return listed


def conditioning(pipe, labels, n: int, prompt=None) -> dict:
    """The model's keyword conditioning for n images: class_labels and/or the encoded prompts (a text
    model without a prompt gets the empty prompt)."""
    checked = class_labels(pipe, labels, n)
    cond = {} if checked is None else {"class_labels": checked}
    listed = prompts(pipe, prompt, n, stacklevel=5)
    if listed is None and pipe.has_text:
        listed = [""] * n                       # a text model without a prompt: the empty prompt
    if listed is not None:
        cond.update(pipe.model.encode_text(listed))
    return cond


def check_image(pipe, image: torch.Tensor) -> torch.Tensor:
    """The image an edit starts from as a (N, C, H, W) batch on pipe's device; refused unless it has the
    model's (C, H, W)."""
    if image.ndim == 3:
        image = image[None]
    if tuple(image.shape[1:]) != pipe.image_shape:
        raise ConfigError(f"image of shape {tuple(image.shape[1:])} does not match the model's "
                          f"{pipe.image_shape}; load it with Pipeline.load_image(path).")
    return image.to(pipe.device)


def guided(pipe, guidance_scale: float = 1.0, guides: Sequence[Guide] = (), classifier=None,
           classifier_scale: float = 0.0, target_class=None, negative_prompt: str = "") -> Denoiser:
    """pipe's network as one Denoiser with every kind of guidance stacked (see `Pipeline.denoiser`)."""
    check_guidance(pipe, guidance_scale, labels_known=False)      # the labels come with the call
    if negative_prompt:
        check_negative_prompt(pipe, negative_prompt, guidance_scale)
    null_cond = pipe.model.encode_text([negative_prompt]) if pipe.has_text and guidance_scale != 1.0 else None
    return guided_denoiser(Denoiser(pipe.network(), pipe.prediction_type), guidance_scale=guidance_scale,
                           null_label=-1, null_cond=null_cond, guides=guides, classifier=classifier,
                           classifier_scale=classifier_scale,
                           target_class=None if target_class is None else torch.as_tensor(target_class).to(pipe.device))


def source_callback(pipe, guides: Sequence[Guide], cond: dict, callback):
    """The per-step callback: the guides with the source's post-step rule, then callback (as is when none)."""
    source = [g for g in guides if g.weighting == "source"]
    return SourceGuidance(source, pipe.schedule).callback(cond, then=callback) if source else callback


def checked_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse to hand out non-finite images (a NaN guidance scale, corrupt weights)."""
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{what} produced NaN or infinite values; check the guidance scales and that the "
                          f"weights are intact (a re-run with --precision fp32 rules out overflow).")
    return x


OUTPUTS = ("pt", "pil")


def check_output(output: str, channels: int) -> None:
    """Refuse an output kind `sample` cannot return, before any sampling."""
    if output == "pil" and channels not in (1, 3):
        raise ConfigError(f"output=\"pil\" needs 1 or 3 channels, the model makes {channels}; use output=\"pt\".")
    if output not in OUTPUTS:
        raise ConfigError(f"output={output!r}; use output=\"pt\" (a tensor (N, C, H, W) in [-1, 1], the default) "
                          "or output=\"pil\" (a list of PIL images).")


def as_output(images: torch.Tensor, output: str):
    """Images (N, C, H, W) in [-1, 1] as the caller asked: the tensor, or a list of PIL images."""
    if output == "pil":
        from .viz import to_pil
        return to_pil(images)
    return images
