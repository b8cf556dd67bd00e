"""What the web demo's buttons do: plain functions of a Pipeline and the widgets' values.

Each handler checks the values as they arrive from the page (raising DemoInputError with the fix),
calls the library, and returns pictures ready to show: the model's images enlarged (nearest
neighbour) to about DISPLAY_SIZE pixels. Tests call them directly, without a browser or a server;
`diffusekit.demo` wires them to widgets. Gradio is only touched for notes (gr.Warning, a Python
warning outside a request) and gr.skip.
"""
from __future__ import annotations

import queue
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import read_image_array
from .metrics import psnr
from .viz import make_grid, plot_schedule, save_trajectory

DISPLAY_SIZE = 256          # images are shown upscaled (nearest) to about this many pixels a side
MAX_IMAGES, MAX_STEPS = 16, 100       # what the sliders offer (Gradio checks API calls against them too)
MASK_COVERAGE = 0.5         # a model pixel is filled when at least half of it is painted
UNCONDITIONAL, EACH_CLASS = "unconditional", "each class in turn"
# warnings.catch_warnings swaps process-wide state, so concurrent requests take turns loading images
_IMAGE_LOCK = threading.Lock()


class DemoInputError(ValueError):
    """Something set on the page that cannot be used as it is; the message says how to fix it."""


def import_gradio():
    """gradio, or an ImportError that names the extra to install."""
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the web demo needs Gradio, an optional dependency: pip install -e \".[demo]\" from a clone') from e
    return gr


def _note(message: str) -> None:
    """A yellow note on the page (a Python warning when called outside a request)."""
    import_gradio().Warning(message)


# --- pixels for the page ----------------------------------------------------------------------------
def display_factor(pipe) -> int:
    """The nearest-neighbour upscale that shows the model's images at about DISPLAY_SIZE pixels."""
    return max(1, DISPLAY_SIZE // max(pipe.image_shape[1:]))


def to_display(images: torch.Tensor, factor: int) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] as one upscaled uint8 grid, (H', W') or (H', W', 3)."""
    grid = make_grid(images, upscale=factor, padding=2 if len(images) > 1 else 0)
    return grid[:, :, 0] if grid.shape[-1] == 1 else grid


def _figure_pixels(draw) -> np.ndarray:
    """Run a viz function that writes a PNG and return the picture as an RGB array."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as folder:
        with Image.open(draw(Path(folder) / "figure.png")) as img:
            return np.asarray(img.convert("RGB"))


def _lossless(pixels: np.ndarray, image_shape) -> np.ndarray | None:
    """Drop what carries no information (an opaque alpha, grey kept in RGB, a nearest-neighbour
    enlargement such as this page shows) so that only real conversions earn a note; None: nothing to drop."""
    out = pixels
    if out.shape[-1] in (2, 4) and (out[:, :, -1] == 1).all():
        out = out[:, :, :-1]
    if out.shape[-1] == 3 and image_shape[0] == 1 and (out == out[:, :, :1]).all():
        out = out[:, :, :1]
    k = out.shape[0] // image_shape[1]
    if k > 1 and _is_enlarged(out, image_shape[1:], k):
        out = out[::k, ::k]
    return None if out is pixels else out


def load_upload(pipe, path) -> torch.Tensor:
    """An uploaded image file as (1, C, H, W) in [-1, 1] at the model's size, noting each conversion.

    Lossless simplifications come first (see _lossless), so a displayed image fed back in loads
    exactly as the model's pixels, without notes.
    """
    if not path:
        raise DemoInputError("no image yet: upload one, or press 'Start from a sample'.")
    from PIL import Image
    try:
        pixels = read_image_array(path)
    except (OSError, ValueError) as e:          # PIL's UnidentifiedImageError is an OSError
        raise DemoInputError(f"the upload could not be read as an image ({e}); upload a PNG or JPEG.") from e
    simpler = _lossless(pixels, pipe.image_shape)
    with _IMAGE_LOCK, warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("always")
        if simpler is not None:
            path = Path(folder) / "image.png"
            simpler = (simpler * 255).round().astype(np.uint8)
            Image.fromarray(simpler[:, :, 0] if simpler.shape[-1] == 1 else simpler).save(path)
        image = pipe.load_image(path)
    for w in caught:
        _note(str(w.message).replace(f"{path}: ", "Uploaded image: "))
    return image


def mask_from_layers(layers, size: tuple[int, int]) -> torch.Tensor:
    """Brush strokes (image files: alpha, or white on black) as a (1, 1, H, W) fill mask, 1 = fill.

    The strokes' square centre (what load_image keeps of the picture) is averaged over each model
    pixel; a pixel is filled when at least MASK_COVERAGE of it is painted.
    """
    painted = None
    for layer in layers or []:
        if layer is not None:
            a = read_image_array(layer)                                  # (h, w, c) in [0, 1]
            stroke = a[:, :, -1] if a.shape[-1] in (2, 4) else a.mean(-1)
            painted = stroke if painted is None else np.maximum(painted, stroke)
    if painted is None or not (painted > 0.5).any():
        raise DemoInputError("the mask is empty: paint white strokes over the part of the image to fill, "
                             "then press Inpaint.")
    x = torch.from_numpy((painted > 0.5).astype(np.float32))[None, None]
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    mask = (F.adaptive_avg_pool2d(x, tuple(size)) >= MASK_COVERAGE).float()
    if not mask.any():
        raise DemoInputError(f"the strokes cover less than half of every pixel of the {size[1]}x{size[0]} "
                             "image, so nothing would be filled; paint with a bigger brush.")
    if mask.all():
        raise DemoInputError("the mask covers the whole image, so nothing of it would be kept; leave part "
                             "unpainted (for a wholly new image use the Sample tab).")
    return mask


# --- widget values to library arguments ----------------------------------------------------------
def takes_prompt(pipe) -> bool:
    return bool(getattr(pipe, "has_text", False))


def class_choices(pipe, each: bool = True) -> list[tuple[str, str]]:
    """(label, value) pairs for the class dropdown; values are what `conditioning` reads."""
    if not pipe.num_classes:
        return [(UNCONDITIONAL, UNCONDITIONAL)]
    names = list(pipe.class_names) if len(pipe.class_names) == pipe.num_classes else []
    classes = [(f"{i}: {names[i]}" if names and names[i] != str(i) else str(i), str(i))
               for i in range(pipe.num_classes)]
    return ([(EACH_CLASS, EACH_CLASS)] if each else []) + [(UNCONDITIONAL, UNCONDITIONAL)] + classes


def conditioning(pipe, label, prompt, n: int) -> dict:
    """Keyword arguments for pipe.sample / edit / invert from the class and prompt widgets."""
    if prompt and str(prompt).strip():
        if not takes_prompt(pipe):
            kind = f"class-conditional ({pipe.num_classes} classes)" if pipe.num_classes else "unconditional"
            fix = "; choose a class instead" if pipe.num_classes else ""
            raise DemoInputError(f"this model is {kind} and takes no prompt: clear the prompt box{fix}.")
        return {"prompt": str(prompt).strip()}
    label = "" if label is None else str(label).strip()
    if label in ("", UNCONDITIONAL):
        return {"class_labels": -1} if pipe.num_classes else {}
    if not pipe.num_classes:
        instead = "describe the image in the prompt instead" if takes_prompt(pipe) else f"choose {UNCONDITIONAL!r}"
        raise DemoInputError(f"class {label!r} was chosen but this model has no classes; {instead}.")
    if label == EACH_CLASS:
        return {"class_labels": torch.arange(n) % pipe.num_classes}
    head = label.split(":")[0].strip()
    # a number is a class index (Pipeline.class_labels checks its range); anything else a class name
    return {"class_labels": int(head) if head.lstrip("-").isdigit() else label}


def _whole(name: str, value, low: int, high: int) -> int:
    if value is None or float(value) != int(float(value)) or not low <= int(float(value)) <= high:
        raise DemoInputError(f"{name}={value!r}; use a whole number from {low} to {high}.")
    return int(float(value))


def _generator(seed) -> torch.Generator:
    return torch.Generator().manual_seed(_whole("seed", seed, 0, 2**63 - 1))


def _guidance(pipe, scale) -> dict:
    scale = float(scale if scale is not None else 1.0)
    if scale != 1.0 and not (pipe.num_classes or takes_prompt(pipe)):
        raise DemoInputError(f"guidance {scale} needs a class- or text-conditional model; set guidance to 1.")
    return {"guidance_scale": scale}


# --- the handlers -------------------------------------------------------------------------------------
class _Cancelled(Exception):
    """Raised inside the sampling thread when the page went away."""


def settings_text(pipe, n: int, sampler, steps: int, seed, label, prompt, guidance: float) -> str:
    """What a picture was drawn with, every setting that changes it: the page shows it under the picture,
    so a setting that did not reach the server (the page still loading, say) is plain to see."""
    text = f"{n} image(s): {sampler}, {steps} steps, seed {int(float(seed))}"
    if prompt and str(prompt).strip():
        text += f", prompt {str(prompt).strip()!r}"
    elif pipe.num_classes:
        text += f", class {str(label).strip() or UNCONDITIONAL}"
    return text + (f", guidance {guidance:g}" if guidance != 1.0 else "")


def generate(pipe, sampler, steps, guidance, seed, label, prompt, n, every: float = 0.25):
    """Sample n images, yielding (grid, status) as the predicted x0 sharpens, then the final grid.

    Sampling runs in a worker thread that reports each step through the Pipeline's callback; a
    picture is sent at most every `every` seconds, and the final one always.
    """
    n, steps = _whole("number of images", n, 1, MAX_IMAGES), _whole("steps", steps, 1, MAX_STEPS)
    kwargs = dict(sampler=sampler, num_steps=steps, generator=_generator(seed), **_guidance(pipe, guidance),
                  **conditioning(pipe, label, prompt, n))
    factor, updates, stop = display_factor(pipe), queue.Queue(), threading.Event()

    def on_step(info):
        if stop.is_set():
            raise _Cancelled()
        updates.put(("step", info.i, info.x0_pred))

    def work():
        try:
            updates.put(("done", pipe.sample(n, callback=on_step, **kwargs)))
        except BaseException as e:  # handed to the request's thread, which reports it
            updates.put(("error", e))

    threading.Thread(target=work, name="diffusekit-demo-sample", daemon=True).start()
    last = time.monotonic()
    try:
        while True:
            kind, *payload = updates.get()
            if kind == "error":
                raise payload[0]
            if kind == "done":
                yield to_display(payload[0], factor), settings_text(pipe, n, sampler, steps, seed, label, prompt,
                                                                    kwargs["guidance_scale"])
                return
            i, x0_pred = payload
            if x0_pred is not None and time.monotonic() - last >= every:
                last = time.monotonic()
                yield to_display(x0_pred.clamp(-1, 1).cpu(), factor), f"step {i + 1}/{steps}: predicted x0"
    finally:
        stop.set()


def starter_image(pipe, seed, label) -> np.ndarray:
    """A sample to edit when there is no upload (20 DPM-Solver++ steps), shown at display size.

    It is drawn with seed + 1, so that editing it with the page's seed starts from other noise
    (with the same noise, inpainting would tend to paint the original back).
    """
    seed = _whole("seed", seed, 0, 2**63 - 2)
    image = pipe.sample(1, "dpmpp_2m", 20, generator=_generator(seed + 1), **conditioning(pipe, label, "", 1))
    return to_display(image, display_factor(pipe))


def sdedit(pipe, path, strength, sampler, steps, seed, label, prompt, guidance):
    """SDEdit the upload: (the input at model size, the edit), both at display size."""
    image = load_upload(pipe, path)
    out = pipe.edit(image, strength=float(strength), sampler=sampler, num_steps=_whole("steps", steps, 1, MAX_STEPS),
                    generator=_generator(seed), **_guidance(pipe, guidance), **conditioning(pipe, label, prompt, 1))
    factor = display_factor(pipe)
    return to_display(image, factor), to_display(out, factor)


def inpaint(pipe, editor, sampler, steps, seed, label, prompt, guidance, resample):
    """Fill what was painted on the image: (the mask, white = filled, and the result)."""
    editor = editor or {}
    image = load_upload(pipe, editor.get("background"))
    mask = mask_from_layers(editor.get("layers"), pipe.image_shape[1:])
    out = pipe.inpaint(image, mask, sampler=sampler, num_steps=_whole("steps", steps, 1, MAX_STEPS),
                       generator=_generator(seed), resample=_whole("resample", resample, 1, 20),
                       **_guidance(pipe, guidance), **conditioning(pipe, label, prompt, 1))
    factor = display_factor(pipe)
    return to_display(mask * 2 - 1, factor), to_display(out, factor)


def normalise_editor(pipe, editor):
    """Show an upload in the inpainting editor at model size, enlarged, so strokes map onto pixels.

    Leaves the editor alone (gr.skip) when it already shows such an image, keeping any strokes.
    """
    background = (editor or {}).get("background")
    if background and _shows_model_pixels(pipe, read_image_array(background)):
        return import_gradio().skip()
    shown = to_display(load_upload(pipe, background), display_factor(pipe))
    return {"background": shown, "layers": [], "composite": shown}


def _shows_model_pixels(pipe, pixels: np.ndarray) -> bool:
    """Whether an image is exactly a model-size image enlarged display_factor times (nearest)."""
    return _is_enlarged(pixels, pipe.image_shape[1:], display_factor(pipe))


def _is_enlarged(pixels: np.ndarray, size, k: int) -> bool:
    """Whether pixels (h, w, c) are exactly an image of `size` enlarged k times (nearest neighbour)."""
    return pixels.shape[:2] == (k * size[0], k * size[1]) and np.array_equal(
        pixels, pixels[::k, ::k].repeat(k, axis=0).repeat(k, axis=1))


def invert_and_edit(pipe, path, steps, refine, source_label, target_label, guidance, source_prompt="",
                    target_prompt=""):
    """DDIM-invert the upload under its class (or prompt), then reconstruct it under that and the target one."""
    image = load_upload(pipe, path)
    steps = _whole("steps", steps, 1, MAX_STEPS)
    source = conditioning(pipe, source_label, source_prompt, 1)
    target = conditioning(pipe, target_label, target_prompt, 1)
    x_T = pipe.invert(image, num_steps=steps, refine_steps=_whole("refine steps", refine, 0, 20), **source)
    recon = pipe.reconstruct(x_T, num_steps=steps, **source)
    edited = pipe.reconstruct(x_T, num_steps=steps, **_guidance(pipe, guidance), **target)
    factor = display_factor(pipe)
    status = f"reconstruction PSNR {psnr(recon, image.cpu()):.2f} dB ({steps} DDIM steps, refine {refine})"
    return to_display(image, factor), to_display(recon, factor), to_display(edited, factor), status


def schedule_picture(pipe) -> np.ndarray:
    """The run's noise schedule: beta_t, alpha_t, abar_t and the signal and noise scales."""
    return _figure_pixels(lambda path: plot_schedule({"this model": pipe.schedule}, path))


def trajectory_picture(pipe, sampler, steps, seed, label, prompt, guidance, n) -> np.ndarray:
    """x_t and the predicted x0 along one denoising run, one column per step."""
    n = _whole("number of images", n, 1, 4)
    _, xs, x0s, ts = pipe.trajectory(n, sampler, _whole("steps", steps, 1, MAX_STEPS), _generator(seed),
                                     **conditioning(pipe, label, prompt, n), **_guidance(pipe, guidance))
    return _figure_pixels(lambda path: save_trajectory(xs, x0s, path, timesteps=ts))
