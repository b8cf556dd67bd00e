"""The web demo in a real browser: Playwright drives headless Chromium (Debian's package) against a
live server on 127.0.0.1, tab by tab, as a person would, and takes a screenshot of each tab.

Needs `bash scripts/setup_browser.sh` (Debian's chromium and the playwright package); skipped otherwise.
Screenshots go to DIFFUSEKIT_SCREENSHOT_DIR when set (docs/img for the README), else to a temporary
folder. The page shows the exact denoiser of the built-in digits (real digits, no training), or the
trained run DIFFUSEKIT_DEMO_RUN=runs/NAME.
"""
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]
pytest.importorskip("gradio", reason="the web demo needs gradio: pip install -e '.[demo]' from a clone")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: "
                               "run scripts/setup_browser.sh")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (no /usr/bin/chromium): run scripts/setup_browser.sh",
                allow_module_level=True)

from diffusekit import demo, demo_handlers as h  # noqa: E402
from diffusekit.data import DataConfig, load_dataset  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402
from diffusekit.schedule import NoiseSchedule  # noqa: E402
from diffusekit.toy import ExactDenoiserModel, GaussianMixture  # noqa: E402
from test_demo import free_port  # noqa: E402

expect = sync_api.expect
TIMEOUT_MS = 30_000                 # generous: the machine may be busy; a passing run takes ~25 s in all
expect.set_options(timeout=TIMEOUT_MS)


class DigitsDenoiser(torch.nn.Module):
    """The exact denoiser of narrow Gaussians around the built-in digits, one mixture per class and one
    for all (the null label -1): an ideal model that draws real digits with no training."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule, std: float = 0.05):
        super().__init__()
        x = images.flatten(1)                                   # (N, 64)
        self.by_class = {c: ExactDenoiserModel(GaussianMixture(x[labels == c], std), schedule)
                         for c in labels.unique().tolist()}
        self.by_class[-1] = ExactDenoiserModel(GaussianMixture(x, std), schedule)

    def forward(self, x, t, class_labels=None):
        if class_labels is None:
            return self.by_class[-1](x, t)
        out = torch.empty_like(x)
        for c in class_labels.unique().tolist():
            pick = class_labels == c
            out[pick] = self.by_class[c](x[pick], t.expand(len(x))[pick])
        return out


@pytest.fixture(scope="module")
def pipe():
    if os.environ.get("DIFFUSEKIT_DEMO_RUN"):
        return Pipeline.load(os.environ["DIFFUSEKIT_DEMO_RUN"], device="cpu")
    digits = load_dataset(DataConfig("digits"))
    schedule = NoiseSchedule.create("linear", num_train_timesteps=1000)
    return Pipeline(DigitsDenoiser(digits.images, digits.labels, schedule), schedule, image_shape=(1, 8, 8),
                    num_classes=10, class_names=digits.class_names, source="digits-ideal-denoiser")


@pytest.fixture(scope="module")
def page(pipe):
    app = demo.launch(pipe, port=free_port(), block=False, quiet=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1100, "height": 820})
        page.set_default_timeout(TIMEOUT_MS)
        page.in_flight = set()                                  # requests sent and not yet answered
        page.on("request", lambda r: page.in_flight.add(r))
        page.on("requestfinished", lambda r: page.in_flight.discard(r))
        page.on("requestfailed", lambda r: page.in_flight.discard(r))
        page.goto(app.local_url)
        # Gradio mounts the page in pieces as its component modules arrive; an edit made before the last
        # one has come can be undone (seen: a sampler chosen just after the page showed went back to its
        # default on a busy machine). Start once nothing has been in flight for a second.
        expect(page.get_by_role("button", name="Generate")).to_be_visible()
        settle(page)
        yield page
        browser.close()
    app.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("DIFFUSEKIT_SCREENSHOT_DIR")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


def close_toasts(page):
    """Close the notes and error messages in the page's corner."""
    toasts = page.get_by_test_id("toast-body")
    for _ in range(20):                  # one at a time: closing one moves the others
        if toasts.count() == 0:
            break
        try:
            toasts.first.get_by_test_id("toast-close").click(timeout=2000)
        except sync_api.TimeoutError:    # it expired meanwhile
            pass
    expect(toasts).to_have_count(0)


def screenshot(page, folder: Path, tab: str) -> Path:
    """The whole page as a small PNG (a 64-colour palette keeps it a few tens of KB), notes closed."""
    close_toasts(page)
    picture = Image.open(io.BytesIO(page.screenshot(full_page=True)))
    path = folder / f"demo_{tab}.png"
    picture.convert("RGB").quantize(64).save(path, optimize=True)
    assert path.stat().st_size < 300_000
    return path


def open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()


def set_number(page, selector: str, value):
    field = page.locator(f"{selector} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def choose(page, selector: str, value: str):
    """Type into a dropdown and take the value (or a custom one where allowed); the box then shows it."""
    box = page.locator(f"{selector} input")
    box.click()
    box.fill(value)
    box.press("Enter")
    page.keyboard.press("Escape")
    expect(box).to_have_value(value)


def shown_pixels(page, selector: str) -> np.ndarray:
    """The image a gr.Image shows, fetched from the server as the browser did."""
    img = page.locator(f"{selector} img").first
    try:
        expect(img).to_be_visible()
    except AssertionError as e:     # say what the page said instead (an error message, say)
        said = page.get_by_test_id("toast-body").all_inner_texts()
        shot = Path(tempfile.gettempdir()) / "diffusekit_demo_failure.png"
        page.screenshot(path=shot)
        raise AssertionError(f"no image in {selector}; the page says {said}, requests in flight: "
                             f"{[r.url for r in page.in_flight]} (screenshot: {shot})") from e
    body = page.request.get(img.get_attribute("src")).body()
    return np.asarray(Image.open(io.BytesIO(body)))


def shows_eventually(page, selector: str, expected: np.ndarray) -> np.ndarray:
    """The image in selector once it equals expected, or the last one seen after the timeout.

    A streamed handler (Generate) sends previews before the final picture; the status box can show the
    final text a moment before the <img> swaps its source, so one read may still see the last preview.
    """
    for _ in range(TIMEOUT_MS // 250):
        shown = shown_pixels(page, selector)
        shown = shown if shown.ndim == 2 else shown[..., 0]
        if shown.shape == expected.shape and np.array_equal(shown, expected):
            break
        page.wait_for_timeout(250)
    return shown


def settle(page, quiet_ms: int = 1000):
    """Until the page has had no request in flight for quiet_ms (queued events, uploads, files)."""
    quiet = 0
    for _ in range(TIMEOUT_MS // 100):
        quiet = quiet + 100 if not page.in_flight else 0
        if quiet >= quiet_ms:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"requests still in flight: {[r.url for r in page.in_flight]}")


def wait_for_editor_image(page):
    """Until the inpainting editor shows a background (its zoom readout appears) and has sent it back."""
    editor = page.locator("#inpaint-editor")
    expect(editor).to_contain_text(re.compile(r"\d+%"))
    settle(page)


def class_value(pipe, k: int) -> str:
    return dict((v, label) for label, v in h.class_choices(pipe)).get(str(k), h.UNCONDITIONAL)


def test_sample_tab_generates_the_seeds_images(page, pipe, shots):
    label = class_value(pipe, 3)
    wanted = h.settings_text(pipe, 4, "ddim", 6, 5, "3" if pipe.num_classes else "", "", 1.0)
    status = page.locator("#sample-status textarea")
    # The status line names every setting the picture was drawn with. Should the page still drop one (a
    # Gradio page can undo an edit made while it mounts), the test, like a person, sets them again:
    # at most three times, and then says which settings the page used.
    for _ in range(3):
        choose(page, "#sample-sampler", "ddim")
        set_number(page, "#sample-steps", 6)
        set_number(page, "#sample-n", 4)
        page.locator("#sample-seed input").fill("5")
        choose(page, "#sample-class", label)
        page.get_by_role("button", name="Generate").click()
        try:
            expect(status).to_have_value(wanted)
            break
        except AssertionError:
            settle(page)
    assert status.input_value() == wanted, "the page drew the picture with other settings than the test set"
    x = pipe.sample(4, "ddim", 6, generator=torch.Generator().manual_seed(5),
                    **h.conditioning(pipe, "3" if pipe.num_classes else "", "", 4))
    expected = h.to_display(x, h.display_factor(pipe))
    grid = shows_eventually(page, "#sample-output", expected)
    assert grid.shape[:2] == expected.shape[:2] == (2 * (256 + 2) + 2,) * 2
    np.testing.assert_array_equal(grid, expected)
    screenshot(page, shots, "sample")


def test_a_bad_class_shows_a_message(page, pipe):
    if not pipe.num_classes:
        pytest.skip("an unconditional model has no class box")
    choose(page, "#sample-class", str(pipe.num_classes + 2))
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(re.compile("out of range")).first).to_be_visible()
    choose(page, "#sample-class", class_value(pipe, 3))


def test_edit_tab_takes_an_upload_of_the_wrong_size(page, shots, tmp_path):
    open_tab(page, "Edit (SDEdit)")
    picture = np.zeros((20, 20, 3), np.uint8)
    picture[4:16, 8:12] = 255                                   # a bar, in RGB at 20x20
    Image.fromarray(picture).save(tmp_path / "bar.png")
    page.locator("#edit-input input[type=file]").set_input_files(str(tmp_path / "bar.png"))
    expect(page.locator("#edit-input img")).to_be_visible()
    set_number(page, "#edit-steps", 8)
    page.get_by_role("button", name="Edit", exact=True).click()
    expect(page.get_by_text(re.compile("resized 20x20 to")).first).to_be_visible()
    assert shown_pixels(page, "#edit-output").shape[:2] == (256, 256)
    screenshot(page, shots, "edit")


def paint_left_half(page):
    """Mouse strokes, zigzag, over the left part of the image in the inpainting editor."""
    canvas = page.locator("#inpaint-editor canvas").first.bounding_box()
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(cx - 110, cy - 110)
    page.mouse.down()
    for k in range(8):                                          # each pointer event costs a canvas redraw
        page.mouse.move(cx - 30, cy - 110 + 30 * k)
        page.mouse.move(cx - 110, cy - 95 + 30 * k)
    page.mouse.up()


def test_inpaint_tab_fills_what_the_mouse_painted(page, shots):
    open_tab(page, "Inpaint")
    set_number(page, "#inpaint-steps", 8)
    toasts = page.get_by_test_id("toast-body")
    # Gradio's ImageEditor can drop strokes drawn while it is still taking in an image the server set
    # (gradio-app/gradio#7200); on a starved CPU that window outlasts any wait. The page then says so,
    # and the test, like a person, starts again: at most three times.
    for attempt in range(3):
        page.get_by_role("button", name="Start from a sample").locator("visible=true").click()
        wait_for_editor_image(page)
        paint_left_half(page)
        settle(page)                                            # the editor has sent its strokes
        page.get_by_role("button", name="Inpaint", exact=True).click()
        expect(page.locator("#inpaint-output img").or_(toasts).first).to_be_visible()
        said = toasts.all_inner_texts()
        if not said:
            break
        assert re.search("the mask is empty|no image yet", " ".join(said)), said
        close_toasts(page)
    assert shown_pixels(page, "#inpaint-output").shape[:2] == (256, 256)
    mask = shown_pixels(page, "#inpaint-mask")
    mask = mask if mask.ndim == 2 else mask[..., 0]
    filled = (mask[::32, ::32] > 128).astype(int)              # one entry per model pixel
    assert filled[:, :3].mean() > 0.5 and not filled[:, 5:].any(), f"painted left, right kept:\n{filled}"
    screenshot(page, shots, "inpaint")


def test_invert_tab_reconstructs_and_edits(page, shots):
    open_tab(page, "Invert and edit")
    page.get_by_role("button", name="Start from a sample").locator("visible=true").click()
    expect(page.locator("#invert-input img")).to_be_visible()
    set_number(page, "#invert-steps", 20)
    page.get_by_role("button", name="Invert and edit").click()
    expect(page.locator("#invert-status textarea")).to_have_value(re.compile(r"PSNR \d+\.\d+ dB"))
    assert shown_pixels(page, "#invert-output").shape[:2] == (256, 256)
    screenshot(page, shots, "invert")


def test_schedule_tab_shows_a_trajectory(page, shots):
    open_tab(page, "Schedule and trajectory")
    page.get_by_role("button", name="Show the trajectory").click()
    assert shown_pixels(page, "#trajectory-output").shape[0] > 100
    screenshot(page, shots, "schedule")
