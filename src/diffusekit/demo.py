"""The web demo (`diffusekit demo RUN`): a Gradio page over a Pipeline, served on 127.0.0.1.

Tabs: Sample (with live progress), Edit (SDEdit), Inpaint (the mask painted on the image), Invert
and edit (DDIM inversion, reconstructed under another class), Schedule and trajectory. The widgets
call the handlers of `demo_handlers` through `_on_page`, which turns every error into a message on
the page rather than a stack trace. Requests are queued, one queue per kind of request, so a long
sampling run does not hold up the rest of the page. Gradio is an optional dependency
(pip install -e ".[demo]" from a clone) and is imported only when a page is built.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from .config import ConfigError
from .demo_handlers import (DISPLAY_SIZE, MAX_IMAGES, MAX_STEPS, DemoInputError, class_choices, display_factor,
                            generate, import_gradio, inpaint, invert_and_edit, normalise_editor, schedule_picture,
                            sdedit, starter_image, takes_prompt, trajectory_picture)

__all__ = ["build_demo", "launch", "DemoInputError"]


def _on_page(gr, fn, pipe):
    """fn(pipe, *widget values) as an event handler whose errors reach the page as messages."""
    def message(e: Exception):
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, ValueError):          # DemoInputError, ConfigError: checks that name the fix
            return gr.Error(str(e), print_exception=False)
        return gr.Error(f"{type(e).__name__}: {e}. This is a bug rather than a setting; please report it "
                        "with the settings used.")

    if inspect.isgeneratorfunction(fn):
        def handler(*values):
            try:
                yield from fn(pipe, *values)
            except Exception as e:
                raise message(e) from None
    else:
        def handler(*values):
            try:
                return fn(pipe, *values)
            except Exception as e:
                raise message(e) from None
    handler.__name__ = fn.__name__
    return handler


def _shown(gr, label: str, **kw):
    return gr.Image(label=label, format="png", interactive=False, **kw)


def _upload(gr, label: str, **kw):
    return gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png",
                    **kw)


def _controls(gr, pipe, tab: str, steps: int = 20, each: bool = True):
    """The sampler, steps, seed, class, prompt and guidance widgets that the tabs share (ids: tab-name)."""
    from .samplers import SAMPLERS
    with gr.Row():
        sampler = gr.Dropdown(sorted(SAMPLERS), value="dpmpp_2m", label="sampler", elem_id=f"{tab}-sampler")
        steps = gr.Slider(1, MAX_STEPS, value=steps, step=1, label="steps", elem_id=f"{tab}-steps")
        seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id=f"{tab}-seed")
    with gr.Row():
        choices = class_choices(pipe, each)
        label = gr.Dropdown(choices, value=choices[0][1], label="class", allow_custom_value=True,
                            visible=bool(pipe.num_classes), elem_id=f"{tab}-class")
        prompt = gr.Textbox(label="prompt", visible=takes_prompt(pipe), elem_id=f"{tab}-prompt")
        guidance = gr.Slider(0, 10, value=1, step=0.5, label="guidance scale (1 = none)",
                             visible=bool(pipe.num_classes), elem_id=f"{tab}-guidance")
    return sampler, steps, seed, label, prompt, guidance


def _sample_tab(gr, pipe):
    with gr.Tab("Sample", id="sample"), gr.Row():
        with gr.Column():
            sampler, steps, seed, label, prompt, guidance = _controls(gr, pipe, "sample")
            n = gr.Slider(1, MAX_IMAGES, step=1, label="number of images", elem_id="sample-n",
                          value=pipe.num_classes if 1 < pipe.num_classes <= MAX_IMAGES else 8)
            button = gr.Button("Generate", variant="primary")
            status = gr.Textbox(label="status", interactive=False, elem_id="sample-status")
        out = _shown(gr, "samples", elem_id="sample-output")
    button.click(_on_page(gr, generate, pipe), [sampler, steps, guidance, seed, label, prompt, n], [out, status],
                 api_name="generate")


def _edit_tab(gr, pipe):
    with gr.Tab("Edit (SDEdit)", id="edit"):
        with gr.Row():
            upload = _upload(gr, "image to edit", elem_id="edit-input")
            before, after = _shown(gr, "input at the model's size"), _shown(gr, "edited", elem_id="edit-output")
        strength = gr.Slider(0.05, 1, value=0.6, step=0.05, label="strength (0 keeps the image, 1 ignores it)")
        sampler, steps, seed, label, prompt, guidance = _controls(gr, pipe, "edit", each=False)
        with gr.Row():
            start, button = gr.Button("Start from a sample"), gr.Button("Edit", variant="primary")
    start.click(_on_page(gr, starter_image, pipe), [seed, label], upload, api_name="edit_start")
    button.click(_on_page(gr, sdedit, pipe), [upload, strength, sampler, steps, seed, label, prompt, guidance],
                 [before, after], api_name="edit")


def _inpaint_tab(gr, pipe):
    with gr.Tab("Inpaint", id="inpaint"):
        with gr.Row():
            editor = gr.ImageEditor(
                label="paint white over what to fill", type="filepath", image_mode="RGBA", format="png",
                sources=["upload", "clipboard"], transforms=(), layers=False, elem_id="inpaint-editor",
                canvas_size=(DISPLAY_SIZE, DISPLAY_SIZE), eraser=gr.Eraser(default_size=DISPLAY_SIZE // 16),
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=DISPLAY_SIZE // 16))
            mask = _shown(gr, "mask (white = filled)", elem_id="inpaint-mask")
            out = _shown(gr, "inpainted", elem_id="inpaint-output")
        sampler, steps, seed, label, prompt, guidance = _controls(gr, pipe, "inpaint", steps=50, each=False)
        resample = gr.Slider(1, 10, value=1, step=1, label="resample (RePaint jumps per step)")
        with gr.Row():
            start, button = gr.Button("Start from a sample"), gr.Button("Inpaint", variant="primary")
    start.click(_on_page(gr, starter_image, pipe), [seed, label], editor, api_name="inpaint_start")
    editor.upload(_on_page(gr, normalise_editor, pipe), editor, editor, api_name=False)
    button.click(_on_page(gr, inpaint, pipe), [editor, sampler, steps, seed, label, prompt, guidance, resample],
                 [mask, out], api_name="inpaint")


def _invert_tab(gr, pipe):
    with gr.Tab("Invert and edit", id="invert"):
        with gr.Row():
            upload = _upload(gr, "image to invert", elem_id="invert-input")
            before, recon = _shown(gr, "input at the model's size"), _shown(gr, "DDIM reconstruction")
            edited = _shown(gr, "reconstructed under the target class", elem_id="invert-output")
        with gr.Row():
            steps = gr.Slider(2, MAX_STEPS, value=50, step=1, label="DDIM steps", elem_id="invert-steps")
            refine = gr.Slider(0, 10, value=0, step=1, label="refine steps (fixed-point iterations)")
            seed = gr.Number(0, precision=0, minimum=0, label="seed (for 'Start from a sample')")
        with gr.Row(visible=bool(pipe.num_classes) or takes_prompt(pipe)):
            choices, text, classes = class_choices(pipe, each=False), takes_prompt(pipe), bool(pipe.num_classes)
            source = gr.Dropdown(choices, value=choices[0][1], label="the image's class", allow_custom_value=True,
                                 visible=classes)
            target = gr.Dropdown(choices, value=choices[-1][1], label="target class", allow_custom_value=True,
                                 visible=classes)
            source_prompt = gr.Textbox(label="the image's prompt", visible=text)
            target_prompt = gr.Textbox(label="target prompt", visible=text)
            guidance = gr.Slider(0, 10, value=1, step=0.5, label="guidance scale for the target")
        status = gr.Textbox(label="status", interactive=False, elem_id="invert-status")
        with gr.Row():
            start, button = gr.Button("Start from a sample"), gr.Button("Invert and edit", variant="primary")
    start.click(_on_page(gr, starter_image, pipe), [seed, source], upload, api_name="invert_start")
    button.click(_on_page(gr, invert_and_edit, pipe),
                 [upload, steps, refine, source, target, guidance, source_prompt, target_prompt],
                 [before, recon, edited, status], api_name="invert")


def _schedule_tab(gr, pipe):
    with gr.Tab("Schedule and trajectory", id="schedule"):
        _shown(gr, "noise schedule", value=schedule_picture(pipe))
        sampler, steps, seed, label, prompt, guidance = _controls(gr, pipe, "trajectory", steps=10)
        n = gr.Slider(1, 4, value=2, step=1, label="number of trajectories")
        button = gr.Button("Show the trajectory", variant="primary")
        out = _shown(gr, "denoising trajectory", elem_id="trajectory-output")
    button.click(_on_page(gr, trajectory_picture, pipe), [sampler, steps, seed, label, prompt, guidance, n], out,
                 api_name="trajectory")


def _describe(pipe) -> str:
    c, h, w = pipe.image_shape
    classes = (f"{pipe.num_classes} classes" if pipe.num_classes else "text-conditioned" if takes_prompt(pipe)
               else "unconditional")
    return (f"{h}x{w} images, {c} channel{'s' * (c > 1)}, {classes}; predicts {pipe.prediction_type} over "
            f"{pipe.schedule.num_train_timesteps} training timesteps. Images are shown enlarged "
            f"{display_factor(pipe)}x.")


def build_demo(pipe, concurrency: int = 2, title: str | None = None):
    """The Gradio page (a queued gr.Blocks) over a Pipeline: sample, edit, inpaint, invert, schedule.

    concurrency: requests of one kind served at once; more wait in that kind's queue.
    """
    gr = import_gradio()
    title = title or f"diffusekit: {Path(pipe.source).name if pipe.source else 'model'}"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n{_describe(pipe)}")
        with gr.Tabs():
            for tab in (_sample_tab, _edit_tab, _inpaint_tab, _invert_tab, _schedule_tab):
                tab(gr, pipe)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo


def _pipeline(source, device, precision):
    from .pipeline import Pipeline
    if not isinstance(source, (str, Path)):
        return source
    if (Path(source) / "model_index.json").exists():       # a diffusers pipeline folder
        pipe = Pipeline.from_diffusers(source, device=device, precision=precision)
    else:
        pipe = Pipeline.load(source, device=device, precision=precision)
    pipe.use_cuda_graphs("auto")        # on a GPU: the page samples small batches, where launches dominate
    return pipe


def check_address(host: str, port: int) -> None:
    """Refuse a host this machine cannot serve on, or a port in use, with a message that says which and what to do.

    (The web server's own error for both is one OSError text that names neither.)
    """
    import errno
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"host {host!r} is not an address or name this machine can resolve ({e}); serve on "
                          "127.0.0.1 (this machine only) or 0.0.0.0 (every network interface).") from None
    with socket.socket(family, kind, proto) as probe:
        # as the web server binds: SO_REUSEADDR, so that a recently closed server does not count as busy
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another demo or server is running there); "
                                  f"stop it, or choose a free port (--port {port + 1}, port={port + 1}).") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"host {host!r} is not an address of this machine; serve on 127.0.0.1 (this "
                                  "machine only) or 0.0.0.0 (every network interface).") from None
            if e.errno == errno.EACCES:
                raise ConfigError(f"port {port} needs administrator rights on this system; choose a port above "
                                  "1023 (--port 7860).") from None
            raise


def launch(run_or_pipe, host: str = "127.0.0.1", port: int = 7860, share: bool = False, *, concurrency: int = 2,
           device: str = "auto", precision: str = "auto", block: bool = True, quiet: bool = False):
    """Serve the demo for a run directory, a diffusers folder or a Pipeline at http://host:port.

    share=True asks Gradio for a public link (off by default: the page runs models on this machine).
    block=False returns once the server is up (see .local_url; stop it with .close()).
    Returns the launched gr.Blocks.
    """
    gr = import_gradio()
    check_address(host, port)                   # before the model loads: a busy port is known at once
    demo = build_demo(_pipeline(run_or_pipe, device, precision), concurrency=concurrency)
    # system fonts: the page loads nothing from the internet
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                show_error=False, ssr_mode=False, theme=theme, max_file_size="20mb")
    return demo
