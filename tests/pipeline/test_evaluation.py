"""Classifier training and run evaluation: a judge that learns, round trips, clear errors, metrics end to end."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from diffusekit import store as ckpt
from diffusekit.store.classifier import ClassifierTrainConfig, default_classifier_config, load_classifier
from diffusekit.training.classifier import random_shift, train_classifier
from diffusekit.data import DataConfig, load_dataset, split_heldout
from diffusekit.evaluation import _share, evaluate_run, judge_accuracy, reference_key
from diffusekit.metrics import RawPixelFeatures
from diffusekit.nn.unet import UNetConfig
from diffusekit.schedule import ScheduleConfig
from diffusekit.store.run_config import RunConfig, TrainConfig
from idx_files import write_idx
from diffusekit.training import train

RESULT_KEYS = {"fd", "kid_mean", "kid_std", "precision", "recall", "sampler", "steps", "nfe", "wall_time_s", "n"}




@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A clean-image classifier trained on 8x8 digits for 100 steps (a few seconds)."""
    out = tmp_path_factory.mktemp("judge")
    result = train_classifier(DataConfig(), out, train_cfg=ClassifierTrainConfig(
        steps=100, batch_size=64, warmup_steps=10, max_shift=0, device="cpu"), progress=False)
    return out, result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A class-conditional UNet with a handful of channels trained 30 steps on digits."""
    from diffusekit.pipeline import Pipeline
    out = tmp_path_factory.mktemp("run")
    model = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), num_heads=2, groups=4, num_classes=10)
    cfg = RunConfig(model=model, schedule=ScheduleConfig(num_train_timesteps=100), data=DataConfig(),
                    train=TrainConfig(steps=30, batch_size=32, warmup_steps=5, log_every=10, save_every=30,
                                      sample_every=0, device="cpu"))
    train(cfg, out, progress=False)
    return out, Pipeline.load(out)


# --- classifier training ------------------------------------------------------------------------


def test_classifier_learns_digits_and_round_trips(judge):
    out, result = judge
    assert result.accuracy > 0.8                                   # chance is 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_accuracy"] == result.accuracy and metrics["heldout_n"] == 180
    assert {p.name for p in out.iterdir()} >= {"config.json", "classifier.safetensors", "metrics.json"}
    assert not list(out.glob("*.tmp"))
    model, cfg = load_classifier(out)
    assert cfg.classifier == result.config.classifier and cfg.class_names == [str(i) for i in range(10)]
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
        assert torch.equal(load_classifier(out / "classifier.safetensors")[0](x), model(x))
    # the held-out accuracy is what judge_accuracy finds on the same held-out images
    data = load_dataset(DataConfig())
    _, held, _ = split_heldout(DataConfig(), data, 0.1, seed=0)
    assert judge_accuracy(model, held.images, held.labels) == pytest.approx(result.accuracy)


def test_load_classifier_errors_name_the_problem(judge, tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        load_classifier(tmp_path / "nowhere")
    out, _ = judge
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((out / "config.json").read_text())
    save_file({"head.weight": torch.zeros(10, 4)}, str(bad / "classifier.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="missing from the file"):
        load_classifier(bad)


def test_noise_aware_classifier_reports_accuracy_over_t(tmp_path):
    cfg = default_classifier_config(8, 1, 10, base_channels=8, channel_mult=(1, 2), groups=4)
    result = train_classifier(DataConfig(), tmp_path, cfg, ClassifierTrainConfig(
        steps=20, batch_size=32, noise_aware=True, device="cpu"), ScheduleConfig(num_train_timesteps=100),
        progress=False)
    by_t = result.metrics["heldout_accuracy_at_t"]
    assert set(by_t) == {"0", "25", "50", "75", "99"} and all(0 <= a <= 1 for a in by_t.values())
    _, loaded = load_classifier(tmp_path)
    assert loaded.train.noise_aware and loaded.train.schedule.num_train_timesteps == 100


class _Stopped(Exception):
    """Stands for a process that died right after a save."""


def test_classifier_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """The classifier trains on the one skeleton: stopped after its first save and resumed, it ends with
    the weights of a straight run, bit for bit (CPU, fp32)."""
    ccfg = default_classifier_config(8, 1, 10, base_channels=8, channel_mult=(1, 2), groups=4)
    tc = ClassifierTrainConfig(steps=8, batch_size=32, save_every=4, log_every=2, device="cpu", precision="fp32")
    straight = train_classifier(DataConfig(), tmp_path / "straight", ccfg, tc, progress=False)
    real_save = ckpt.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Stopped
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stopped):
        train_classifier(DataConfig(), tmp_path / "stopped", ccfg, tc, progress=False)
    monkeypatch.undo()
    assert ckpt.read_trainer_state(tmp_path / "stopped")["step"] == 4
    with pytest.raises(ckpt.CheckpointError, match="already holds a checkpoint at step 4"):
        train_classifier(DataConfig(), tmp_path / "stopped", ccfg, tc, progress=False)
    resumed = train_classifier(DataConfig(), tmp_path / "stopped", ccfg, tc, progress=False, resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.accuracy == straight.accuracy
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]               # the standard run folder's log, nothing logged twice


def test_heldout_is_the_idx_test_split(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 8, 8)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    cfg = DataConfig(source=str(tmp_path))
    train_set, held, desc = split_heldout(cfg, load_dataset(cfg), 0.1, seed=0)
    assert (len(train_set), len(held)) == (30, 12) and "t10k" in desc


def test_random_shift_moves_whole_images():
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    y = random_shift(x, 2, torch.Generator().manual_seed(3))
    assert y.shape == x.shape
    for img, out in zip(x, y):     # every output is a translate of its input, padded with -1
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out, torch.roll(img, (dy, dx), (1, 2)).where(_inside(dy, dx), -1.0))]
        assert len(matches) == 1


def _inside(dy, dx):
    rows, cols = torch.arange(6)[:, None] - dy, torch.arange(6)[None] - dx
    return ((rows >= 0) & (rows < 6) & (cols >= 0) & (cols < 6))[None]


# --- evaluation ---------------------------------------------------------------------------------


class CountingFeatures(RawPixelFeatures):
    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += len(images)
        return super().__call__(images)


def test_evaluate_run_reports_metrics_and_caches_the_reference(tiny_run, tmp_path):
    _, pipe = tiny_run
    extractor = CountingFeatures()
    kw = dict(ref=DataConfig(), n=40, sampler="ddim", num_steps=5, features=extractor, cache_dir=tmp_path,
              seed=0, batch_size=16, progress=False)
    first = evaluate_run(pipe, **kw)
    assert RESULT_KEYS <= set(first)
    assert all(math.isfinite(first[k]) for k in ("fd", "kid_mean", "kid_std", "precision", "recall", "wall_time_s"))
    assert first["nfe"] == pipe.sampler_for("ddim").nfe(5) == 5 and first["nfe_source"] == "counted"
    assert extractor.images == 40 + 1797                   # the samples, then all reference digits
    cache = tmp_path / f"{reference_key(DataConfig(), 1797)}-raw-pixels.npz"
    mtime = cache.stat().st_mtime_ns
    second = evaluate_run(pipe, **kw)
    assert extractor.images == 40 + 1797 + 40              # only the samples: the reference came from the cache
    assert cache.stat().st_mtime_ns == mtime
    assert second["fd"] == pytest.approx(first["fd"])      # same seed, same samples


def test_evaluate_run_counts_heun_and_guidance_evaluations(tiny_run, tmp_path):
    _, pipe = tiny_run
    heun = evaluate_run(pipe, DataConfig(), 20, sampler="heun", num_steps=4, features="raw", cache_dir=tmp_path, batch_size=20, progress=False)
    assert heun["nfe"] == pipe.sampler_for("heun").nfe(4) == 7                      # 2n - 1
    cfg = evaluate_run(pipe, DataConfig(), 20, sampler="ddim", num_steps=4, features="raw", cache_dir=tmp_path, batch_size=20, guidance_scale=2.0,
                       progress=False)
    assert cfg["nfe"] == 8                                 # conditional and unconditional pass per step


def test_evaluate_run_with_the_judge(tiny_run, judge, tmp_path):
    _, pipe = tiny_run
    out, _ = judge
    result = evaluate_run(pipe, DataConfig(), 30, sampler="ddim", num_steps=5, features=f"classifier:{out}", cache_dir=tmp_path, batch_size=30,
                          progress=False)
    assert result["features"].startswith("classifier-") and 0 <= result["judge_accuracy"] <= 1
    assert math.isfinite(result["fd"])


def test_work_shares_cover_every_sample_once():
    for n, world in ((10, 3), (2, 4), (9, 1)):
        shares = [_share(n, r, world) for r in range(world)]
        assert sum(c for _, c in shares) == n
        assert [s for s, _ in shares] == [sum(c for _, c in shares[:r]) for r in range(world)]


def test_work_shares_are_whole_batches_of_the_one_process_grid():
    """Under torchrun each rank generates whole batches of the grid one process would use (batch i
    starts at sample i * batch_size and is seeded by that index), so the images do not depend on the
    number of processes; ranks left without a batch get none."""
    for n, world, batch in ((24, 2, 5), (10, 3, 4), (7, 4, 3), (100, 8, 250), (9, 1, 2)):
        shares = [_share(n, r, world, batch) for r in range(world)]
        assert sum(c for _, c in shares) == n
        assert [s for s, _ in shares] == [sum(c for _, c in shares[:r]) for r in range(world)]
        assert [first for s, c in shares for first in range(s, s + c, batch)] == list(range(0, n, batch))
        batches = [-(-c // batch) for _, c in shares]
        assert max(batches) - min(batches) <= 1, "work is balanced to within one batch"


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_train_classifier_and_eval(tiny_run, tmp_path):
    from diffusekit.cli import main
    run_dir, _ = tiny_run
    runner = CliRunner()
    judge_dir = tmp_path / "judge"
    res = runner.invoke(main, ["train-classifier", "--data", "digits", "--out", str(judge_dir), "--train-steps", "20",
                               "--batch-size", "32", "--base-channels", "8", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (judge_dir / "classifier.safetensors").is_file() and (judge_dir / "metrics.json").is_file()
    res = runner.invoke(main, ["eval", str(run_dir), "--ref", "digits", "--n", "20", "--sampler", "ddim",
                               "--steps", "3", "--features", f"classifier:{judge_dir}", "--batch-size", "20",
                               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "eval.json").read_text())
    assert RESULT_KEYS <= set(written) and written["nfe"] == 3 and "fd" in res.output
    res = runner.invoke(main, ["eval", str(run_dir), "--dry-run", "--n", "7"])
    assert res.exit_code == 0 and json.loads(res.output)["n"] == 7
    res = runner.invoke(main, ["train-classifier", "--out", str(tmp_path / "x"), "--dry-run"])
    assert res.exit_code == 0 and json.loads(res.output)["classifier"]["image_size"] == 8
    res = runner.invoke(main, ["eval", str(run_dir), "--features", "nonsense", "--n", "4"])
    assert res.exit_code == 2 and "classifier:PATH" in res.output   # user errors exit 2
