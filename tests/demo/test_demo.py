"""The web demo without a browser: handlers called directly, errors as page messages, and ten
simultaneous requests to a live server on the loopback interface, each answered with its own seed."""
import socket
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web demo needs gradio: pip install -e '.[demo]' from a clone")
# gradio's own queue calls a pandas option that pandas 3 deprecates; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

from diffusekit import demo, demo_handlers as h  # noqa: E402
from diffusekit.data import from_pixels, to_pixels  # noqa: E402
from diffusekit.metrics import psnr  # noqa: E402
from diffusekit.nn.unet import UNet, UNetConfig  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402
from diffusekit.schedule import NoiseSchedule  # noqa: E402


class SlowOnBigBatches(torch.nn.Module):
    """A model that sleeps on batches of 16, to stand for a long request."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, **cond):
        if len(x) >= 16:
            time.sleep(0.1)
        return self.model(x, t, **cond)


def make_pipe(num_classes: int = 10) -> Pipeline:
    """An untrained UNet with a handful of channels on 8x8 images: the page does not care what it draws."""
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), num_heads=2, groups=4, num_classes=num_classes)
    return Pipeline(SlowOnBigBatches(UNet(cfg)), NoiseSchedule.create("linear", num_train_timesteps=100),
                    image_shape=(1, 8, 8), num_classes=num_classes,
                    class_names=[f"digit{i}" for i in range(num_classes)], source="runs/tiny")


class PromptedUNet(torch.nn.Module):
    """An unconditional UNet whose output a prompt shifts: the smallest model with `encode_text`."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.text = unet, torch.nn.Identity()     # .text: the encoder the Pipeline asks about

    def encode_text(self, prompts):
        return {"prompt_code": torch.tensor([[len(p) / 10] for p in prompts])}

    def forward(self, x, t, prompt_code=None):
        return self.unet(x, t) + (0 if prompt_code is None else prompt_code[:, :, None, None])


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def page_error(pipe, fn, *values) -> str:
    """Run fn as the page would and return the message of the gr.Error it raises."""
    handler = demo._on_page(gr, fn, pipe)
    with pytest.raises(gr.Error) as info:
        out = handler(*values)
        if hasattr(out, "__next__"):
            list(out)
    assert "Traceback" not in info.value.message
    return info.value.message


def expected_grid(pipe, seed, n=4, label=3, steps=4, sampler="ddim", guidance=1.0):
    x = pipe.sample(n, sampler, steps, generator=torch.Generator().manual_seed(seed), class_labels=label,
                    guidance_scale=guidance)
    return h.to_display(x, h.display_factor(pipe))


def save_png(pixels: np.ndarray, path):
    Image.fromarray(pixels).save(path)
    return str(path)


# --- handlers ---------------------------------------------------------------------------------------
def test_generate_streams_steps_and_ends_with_the_seeds_images(pipe):
    updates = list(h.generate(pipe, "ddim", 4, 2.0, 7, "3: digit3", "", 4, every=0))
    assert len(updates) == 4 + 1                      # one picture per step, then the final grid
    grid, status = updates[-1]
    np.testing.assert_array_equal(grid, expected_grid(pipe, 7, guidance=2.0))
    assert grid.shape == (2 * (256 + 2) + 2,) * 2     # 2x2 grid of 8x8 images shown at 256 px
    assert status == "4 image(s): ddim, 4 steps, seed 7, class 3: digit3, guidance 2"   # every setting used
    assert "step 1/4" in updates[0][1]
    other = list(h.generate(pipe, "ddim", 4, 2.0, 8, "3: digit3", "", 4))[-1][0]
    assert not np.array_equal(grid, other)


def test_conditioning_reads_the_class_widget(pipe):
    assert h.conditioning(pipe, "3: digit3", "", 2) == {"class_labels": 3}
    assert h.conditioning(pipe, "digit5", "", 1) == {"class_labels": "digit5"}
    assert h.conditioning(pipe, h.UNCONDITIONAL, None, 1) == {"class_labels": -1}
    torch.testing.assert_close(h.conditioning(pipe, h.EACH_CLASS, "", 12)["class_labels"],
                               torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    assert h.conditioning(make_pipe(0), h.UNCONDITIONAL, "", 3) == {}
    assert [v for _, v in h.class_choices(pipe)][:3] == [h.EACH_CLASS, h.UNCONDITIONAL, "0"]


@pytest.mark.parametrize("values, words", [
    (("ddim", 4, 1.0, 0, "12", "", 2), "out of range"),
    (("ddim", 4, 1.0, 0, "3", "a cat", 2), "takes no prompt"),
    (("ddim", 4, 1.0, -1, "3", "", 2), "seed=-1"),
    (("ddim", 4, 1.0, 0, "3", "", 0), "number of images=0"),
    (("ddim", 0, 1.0, 0, "3", "", 1), "steps=0"),
    (("nope", 4, 1.0, 0, "3", "", 1), "nope"),
])
def test_bad_sample_settings_become_page_messages(pipe, values, words):
    assert words in page_error(pipe, h.generate, *values)


def test_unconditional_model_refuses_classes_and_guidance():
    uncond = make_pipe(0)
    assert "unconditional" in page_error(uncond, h.generate, "ddim", 4, 1.0, 0, "3", "", 1)
    assert "guidance" in page_error(uncond, h.generate, "ddim", 4, 3.0, 0, h.UNCONDITIONAL, "", 1)
    assert "takes no prompt" in page_error(uncond, h.generate, "ddim", 4, 1.0, 0, "", "a cat", 1)


def test_a_text_model_takes_prompts_and_refuses_classes():
    text = make_pipe(0)
    text.model = PromptedUNet(text.model)
    assert h.takes_prompt(text) and h.conditioning(text, h.UNCONDITIONAL, " a cat ", 2) == {"prompt": "a cat"}
    cat, dog = (list(h.generate(text, "ddim", 3, 2.0, 0, "", p, 2))[-1][0] for p in ("a cat", "a tall dog"))
    x = text.sample(2, "ddim", 3, generator=torch.Generator().manual_seed(0), prompt="a cat", guidance_scale=2.0)
    np.testing.assert_array_equal(cat, h.to_display(x, h.display_factor(text)))
    assert not np.array_equal(cat, dog)
    assert "describe the image in the prompt" in page_error(text, h.generate, "ddim", 3, 1.0, 0, "3", "", 1)


def test_a_crash_inside_the_library_is_a_message_not_a_traceback(pipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(pipe, "sample", broken)
    message = page_error(pipe, h.generate, "ddim", 4, 1.0, 0, "3", "", 1)
    assert "RuntimeError: mat1 and mat2" in message and "report" in message


def test_upload_of_the_wrong_size_and_mode_is_converted_with_notes(pipe, tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    path = save_png(rgba, tmp_path / "big.png")
    with pytest.warns(UserWarning) as notes:
        before, after = h.sdedit(pipe, path, 0.5, "ddim", 4, 0, h.UNCONDITIONAL, "", 1.0)
    text = " ".join(str(w.message) for w in notes)
    assert "alpha" in text and "3 channel(s) to 1" in text and "resized 20x30 to 8x8" in text
    assert str(tmp_path) not in text                  # notes name the upload, not a server path
    assert before.shape == after.shape == (256, 256)


def test_a_shown_image_fed_back_loads_exactly_and_without_notes(pipe, tmp_path):
    x = from_pixels(to_pixels(pipe.sample(1, "ddim", 3, generator=torch.Generator().manual_seed(1))))
    shown = h.to_display(x, h.display_factor(pipe))
    as_rgba = np.concatenate([np.repeat(shown[:, :, None], 3, -1), np.full((256, 256, 1), 255, np.uint8)], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = h.load_upload(pipe, save_png(as_rgba, tmp_path / "shown.png"))
    torch.testing.assert_close(loaded, x, rtol=0, atol=1e-6)


def test_sdedit_is_reproducible_and_follows_strength(pipe, tmp_path):
    path = save_png(h.starter_image(pipe, 0, "2"), tmp_path / "start.png")
    a = h.sdedit(pipe, path, 0.5, "ddim", 6, 3, "2", "", 1.0)[1]
    b = h.sdedit(pipe, path, 0.5, "ddim", 6, 3, "2", "", 1.0)[1]
    c = h.sdedit(pipe, path, 0.9, "ddim", 6, 3, "2", "", 1.0)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert "no image yet" in page_error(pipe, h.sdedit, None, 0.5, "ddim", 6, 3, "2", "", 1.0)
    (tmp_path / "notes.txt").write_text("not an image")
    assert "could not be read" in page_error(pipe, h.sdedit, str(tmp_path / "notes.txt"), 0.5, "ddim", 6, 3,
                                             "2", "", 1.0)


def stroke_layer(tmp_path, columns: slice, name="layer.png") -> str:
    """A 256x256 RGBA layer with white strokes (alpha 255) over the given pixel columns."""
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:, columns] = 255
    return save_png(layer, tmp_path / name)


def test_inpaint_fills_the_painted_pixels_and_keeps_the_rest(pipe, tmp_path):
    image = h.starter_image(pipe, 0, "4")                # drawn with seed 1: other noise than the fill's
    starter = pipe.sample(1, "dpmpp_2m", 20, generator=torch.Generator().manual_seed(1), class_labels=4)
    np.testing.assert_array_equal(image, h.to_display(starter, h.display_factor(pipe)))
    editor = {"background": save_png(image, tmp_path / "bg.png"), "layers": [stroke_layer(tmp_path, slice(0, 128))]}
    mask, out = h.inpaint(pipe, editor, "ddim", 6, 0, "4", "", 1.0, 1)
    assert (mask[:, :128] == 255).all() and (mask[:, 128:] == 0).all()
    np.testing.assert_array_equal(out[:, 128:], image[:, 128:])
    assert not np.array_equal(out[:, :128], image[:, :128])


@pytest.mark.parametrize("columns, words", [
    (slice(0, 0), "the mask is empty"),
    (slice(0, 256), "covers the whole image"),
    (slice(0, 10), "bigger brush"),                      # a third of one 32-px model pixel
])
def test_bad_masks_become_page_messages(pipe, tmp_path, columns, words):
    editor = {"background": save_png(h.starter_image(pipe, 0, "4"), tmp_path / "bg.png"),
              "layers": [stroke_layer(tmp_path, columns)]}
    assert words in page_error(pipe, h.inpaint, editor, "ddim", 4, 0, "4", "", 1.0, 1)


def test_an_upload_in_the_editor_is_shown_at_model_size(pipe, tmp_path):
    small = save_png(np.full((8, 8), 90, np.uint8), tmp_path / "small.png")
    shown = h.normalise_editor(pipe, {"background": small, "layers": []})
    assert shown["background"].shape == (256, 256) and shown["layers"] == []
    again = h.normalise_editor(pipe, {"background": save_png(shown["background"], tmp_path / "s.png")})
    assert again == gr.skip()                           # already shown: strokes drawn meanwhile stay


def test_invert_and_edit_reports_the_reconstruction(pipe, tmp_path):
    path = save_png(h.starter_image(pipe, 5, "1"), tmp_path / "x.png")
    before, recon, edited, status = h.invert_and_edit(pipe, path, 8, 0, "1", "7", 1.0)
    x = h.load_upload(pipe, path)
    x_T = pipe.invert(x, num_steps=8, class_labels=1)
    expected = psnr(pipe.reconstruct(x_T, num_steps=8, class_labels=1), x)
    assert f"PSNR {expected:.2f} dB" in status
    np.testing.assert_array_equal(edited, h.to_display(pipe.reconstruct(x_T, num_steps=8, class_labels=7), 32))
    assert before.shape == recon.shape == (256, 256)


def test_schedule_and_trajectory_pictures(pipe):
    assert h.schedule_picture(pipe).ndim == 3
    one, two = (h.trajectory_picture(pipe, "ddim", 5, 0, h.EACH_CLASS, "", 2.0, n) for n in (1, 2))
    assert one.shape[-1] == 3 and two.shape[0] > one.shape[0]   # two rows (x_t, x0) per trajectory
    assert "number of images=5" in page_error(pipe, h.trajectory_picture, "ddim", 5, 0, "1", "", 1.0, 5)


def test_missing_gradio_names_the_extra(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[demo\]\""):
        demo.build_demo(pipe)


# --- a live server on the loopback interface -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pipe):
    app = demo.launch(pipe, port=free_port(), block=False, quiet=True)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client
    return Client(server.local_url, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def test_ten_simultaneous_requests_each_get_their_own_seed(pipe, server, client):
    assert server.local_url.startswith("http://127.0.0.1:")
    jobs = {seed: client.submit("ddim", 4, 1.0, seed, "3", "", 4, api_name="/generate") for seed in range(10)}
    for seed, job in jobs.items():
        image_path, status = job.result(timeout=120)
        assert f"seed {seed}" in status
        np.testing.assert_array_equal(np.asarray(Image.open(image_path)), expected_grid(pipe, seed))


def test_a_slow_request_does_not_hold_up_the_page(server, client):
    slow = client.submit("ddim", 100, 1.0, 0, "3", "", 16, api_name="/generate")   # >= 10 s asleep
    time.sleep(0.5)
    started = time.monotonic()
    client.predict("ddim", 3, 0, "2", "", 1.0, 1, api_name="/trajectory")
    assert not slow.done(), f"the trajectory waited {time.monotonic() - started:.1f} s for the slow request"
    slow.cancel()                        # the page closes the stream; sampling stops at its next step


def test_errors_reach_the_api_caller_as_messages(client):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="out of range"):
        client.predict("ddim", 4, 1.0, 0, "12", "", 2, api_name="/generate")
