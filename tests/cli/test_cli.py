"""End to end through the command line on a tiny run: every command writes what it promises."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import diffusekit as dk
from diffusekit.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    r = run("train", "--data", "digits", "--out", out, "--train-steps", 40, "--batch-size", 32, "--sample-every", 0,
            "--save-every", 40, "--seed", 0)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture()
def digit_png(tmp_path):
    x = dk.Pipeline  # noqa: F841  (import check)
    from diffusekit.data import DataConfig, load_dataset, save_image
    img = load_dataset(DataConfig("digits")).images[3]
    path = tmp_path / "in.png"
    save_image(img, path)
    return path


def test_train_writes_the_run_directory(tiny_run):
    for name in ["config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl", "loss.png"]:
        assert (tiny_run / name).exists(), name
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["train"]["steps"] == 40 and cfg["model"]["num_classes"] == 10


def test_sample_grid_and_trajectory(tiny_run, tmp_path):
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    r = run("sample", tiny_run, "--sampler", "ddim", "--steps", 5, "--n", 6, "--seed", 1, "--out", grid,
            "--trajectory", strip, "--class", 3, "--guidance", 2.0)
    assert r.exit_code == 0, r.output
    assert Image.open(grid).size[0] > 8 and Image.open(strip).size[0] > 8
    assert "5 model evaluations" in r.output


def test_sample_is_reproducible_with_a_seed(tiny_run, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        assert run("sample", tiny_run, "--steps", 4, "--n", 4, "--seed", 7, "--out", p).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_pipeline_batches_do_not_change_images(tiny_run):
    pipe = dk.Pipeline.load(tiny_run)
    a = pipe.sample(6, "ddim", 4, generator=torch.Generator().manual_seed(0), batch_size=6)
    b = pipe.sample(6, "ddim", 4, generator=torch.Generator().manual_seed(0), batch_size=4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.shape == (6, 1, 8, 8) and float(a.abs().max()) <= 1


def test_edit_invert_inpaint(tiny_run, digit_png, tmp_path):
    out = tmp_path / "edited.png"
    assert run("edit", tiny_run, "--image", digit_png, "--strength", 0.5, "--steps", 6, "--out", out).exit_code == 0
    assert out.exists()
    r = run("invert", tiny_run, "--image", digit_png, "--steps", 10, "--refine", 2, "--edit-class", 1,
            "--out", tmp_path / "inv")
    assert r.exit_code == 0, r.output
    assert "PSNR" in r.output
    for name in ["noise.safetensors", "reconstruction.png", "edited.png"]:
        assert (tmp_path / "inv" / name).exists()
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "filled.png"
    r = run("inpaint", tiny_run, "--image", digit_png, "--mask", tmp_path / "mask.png", "--steps", 6, "--out", out)
    assert r.exit_code == 0, r.output
    filled, orig = np.asarray(Image.open(out)), np.asarray(Image.open(digit_png))
    assert np.array_equal(filled[:4], orig[:4]), "pixels outside the mask are kept exactly"


def test_plot_schedule_and_dry_run(tmp_path):
    out = tmp_path / "s.png"
    assert run("plot-schedule", "--out", out).exit_code == 0 and out.exists()
    r = run("train", "--data", "digits", "--out", tmp_path / "x", "--train-steps", 5, "--dry-run")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["train"]["steps"] == 5
    assert not (tmp_path / "x").exists()


def test_bad_input_gets_a_clear_message(tiny_run, tmp_path):
    r = CliRunner().invoke(main, ["sample", str(tiny_run), "--class", "12", "--out", str(tmp_path / "g.png")])
    assert r.exit_code != 0 and "class label 12 is out of range" in r.output
    r = CliRunner().invoke(main, ["sample", str(tiny_run), "--sampler", "nope"])
    assert r.exit_code != 0 and "nope" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "missing" in r.output and "Traceback" not in r.output
    mask = np.zeros((5, 5), np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    img = np.zeros((8, 8), np.uint8)
    Image.fromarray(img).save(tmp_path / "i.png")
    r = CliRunner().invoke(main, ["inpaint", str(tiny_run), "--image", str(tmp_path / "i.png"),
                                  "--mask", str(tmp_path / "m.png")])
    assert r.exit_code != 0 and "5x5" in r.output and "8x8" in r.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A digits run trained for 400 steps (about 15 s): enough for guidance to act on real denoising."""
    from diffusekit.training import resolve_run_config, train
    cfg, data = resolve_run_config({"data.source": "digits", "train.steps": 400, "train.batch_size": 32,
                                    "train.sample_every": 0, "train.save_every": 400, "train.device": "cpu"})
    out = tmp_path_factory.mktemp("trained") / "digits"
    train(cfg, out, dataset=data, progress=False)
    return out


def _mean_intensity(path):
    # the grid's padding is the same in every picture, so differences are the images'; [-1, 1] units
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).mean() / 127.5 - 1)


@pytest.mark.slow
def test_cli_gradient_guides_make_digits_brighter_and_darker(trained_run, tmp_path):
    means = {}
    for name, extra in (("plain", []), ("bright", ["--guide", "brightness=0.9"]), ("dark", ["--guide", "brightness=0"]),
                        ("eps", ["--guide", "brightness=0.9@30", "--guide-weighting", "sqrt_abar"])):
        out = tmp_path / f"{name}.png"
        r = run("sample", trained_run, "--sampler", "ddim", "--steps", 20, "--n", 16, "--seed", 3, "--out", out,
                "--nrow", 16, *extra)
        assert r.exit_code == 0, r.output
        means[name] = _mean_intensity(out)
    # the source's rule at its default scale: more than 0.2 either way
    assert means["bright"] - means["plain"] > 0.2 and means["plain"] - means["dark"] > 0.2, means
    assert means["eps"] > means["plain"] + 0.05, means
    r = CliRunner().invoke(main, ["sample", str(trained_run), "--guide", "brightness=2", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "[0, 1]" in r.output and "Traceback" not in r.output


def test_make_shapes_plot_process_and_export(tiny_run, tmp_path):
    r = run("make-shapes", tmp_path / "shapes", "--n", 6)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "shapes" / "metadata.jsonl").exists() and len(list((tmp_path / "shapes").glob("*.png"))) == 6
    r = run("plot-process", "--out", tmp_path / "fwd")
    assert r.exit_code == 0, r.output and len(list((tmp_path / "fwd").glob("*.png"))) >= 2
    r = run("plot-process", tiny_run, "--out", tmp_path / "proc", "--steps", 5)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "proc").glob("*.png"))) == 4
    r = run("export", tiny_run, tmp_path / "exported")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exported" / "scheduler" / "scheduler_config.json").exists()


def test_tune_steps_then_sample_uses_them(tiny_run, tmp_path):
    out = tmp_path / "steps.json"
    r = run("tune-steps", tiny_run, "--nfe", 3, "--sampler", "ddim", "--n", 4, "--reference-steps", 10,
            "--iterations", 1, "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads(out.read_text())
    assert record["sampler"] == "ddim" and record["nfe"] == 3 and len(record["timesteps"]) == 3
    r = run("sample", tiny_run, "--sampler", "ddim", "--timesteps", out, "--n", 2, "--out", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    assert "3 model evaluations" in r.output
    r = CliRunner().invoke(main, ["sample", str(tiny_run), "--sampler", "dpmpp_2m", "--timesteps", str(out),
                                  "--out", str(tmp_path / "h.png")])
    assert r.exit_code == 2 and "tuned for sampler 'ddim'" in r.output
    # eval takes the same steps file: 3 counted model calls per sample, at the tuned times
    r = run("eval", tiny_run, "--sampler", "ddim", "--timesteps", out, "--n", 8, "--batch-size", 8,
            "--out", tmp_path / "e.json", "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["nfe"] == 3 and result["settings"]["timesteps"] == pytest.approx(record["timesteps"])


def test_threads_sets_torchs_thread_count_and_refuses_zero(tmp_path):
    before = torch.get_num_threads()
    try:
        want = 1 if before != 1 else 2
        r = run("--threads", want, "train", "--data", "digits", "--out", tmp_path / "x", "--dry-run")
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    r = CliRunner().invoke(main, ["--threads", "0", "train", "--dry-run"])
    assert r.exit_code == 2 and "--threads" in r.output


def test_sample_refuses_cuda_graphs_on_the_cpu(tiny_run, tmp_path):
    r = run("sample", tiny_run, "--n", 2, "--steps", 2, "--device", "cpu", "--cuda-graphs", "on",
            "--out", tmp_path / "x.png")
    assert r.exit_code != 0 and "needs a CUDA device; this model runs on cpu" in r.output
    assert not (tmp_path / "x.png").exists()
    r = run("sample", tiny_run, "--n", 2, "--steps", 2, "--device", "cpu", "--out", tmp_path / "y.png")
    assert r.exit_code == 0, r.output        # auto: off on the CPU


def test_steps_tuned_at_a_guidance_scale_are_used_at_that_scale_only(tiny_run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    r = run("tune-steps", run_dir, "--nfe", 3, "--sampler", "ddim", "--n", 4, "--reference-steps", 10,
            "--iterations", 1, "--guidance", 2)
    assert r.exit_code == 0, r.output
    assert json.loads((run_dir / "tuned_steps.json").read_text())["guidance_scale"] == 2.0
    r = run("sample", run_dir, "--sampler", "ddim", "--guidance", 2, "--class", "each", "--n", 2,
            "--out", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    assert "using 3 tuned model-call times" in r.output and "3 model evaluations" in r.output
    r = run("sample", run_dir, "--sampler", "ddim", "--n", 2, "--out", tmp_path / "h.png")
    assert r.exit_code == 0, r.output
    assert "tuned at guidance 2.0, sampling at 1.0" in r.output and "20 model evaluations" in r.output


@pytest.mark.slow
def test_train_classifier_resumes_and_takes_precision(tmp_path):
    from diffusekit import store
    out = tmp_path / "judge"
    args = ["train-classifier", "--data", "digits", "--out", out, "--batch-size", 16, "--base-channels", 4,
            "--device", "cpu", "--precision", "fp32"]
    r = run(*args, "--train-steps", 3)
    assert r.exit_code == 0, r.output
    assert store.read_trainer_state(out)["step"] == 3
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "fp32"
    r = CliRunner().invoke(main, [str(a) for a in args + ["--train-steps", 5]])
    assert r.exit_code == 2 and "--resume" in r.output          # a finished classifier is not overwritten
    r = run(*args, "--train-steps", 5, "--resume")
    assert r.exit_code == 0, r.output
    assert store.read_trainer_state(out)["step"] == 5


def test_train_autoencoder_dry_run_resolves_the_factor(tmp_path):
    for factor, mult in (("4", [1, 2, 2]), ("8", [1, 2, 2, 4])):
        r = run("train-autoencoder", "--data", "digits", "--out", tmp_path / "ae", "--factor", factor,
                "--latent-channels", 2, "--train-steps", 7, "--dry-run")
        assert r.exit_code == 0, r.output
        cfg = json.loads(r.stdout)
        assert cfg["autoencoder"]["channel_mult"] == mult and cfg["autoencoder"]["latent_channels"] == 2
        assert cfg["train"]["steps"] == 7 and cfg["autoencoder"]["in_channels"] == 1
    assert not (tmp_path / "ae").exists()
