"""Defaults a CPU can live with: the measured time of a run before it trains, and the lean 32x32 layout on a CPU."""
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffusekit.cli import main
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.training import estimate
from diffusekit.training.resolve import resolve_run_config


def _tiny_config(steps=100, batch=8):
    cfg, _ = resolve_run_config({"data.source": "digits", "train.device": "cpu", "train.steps": steps,
                                 "train.batch_size": batch}, preset="tiny8")
    return replace(cfg, model=replace(cfg.model, base_channels=8, groups=4))


def test_estimate_is_positive_and_scales_with_the_steps():
    cfg = _tiny_config(steps=100)
    before = torch.random.get_rng_state()
    t0 = time.perf_counter()
    e = estimate.estimate_run_time(cfg)
    assert time.perf_counter() - t0 < 10                      # cheap on a tiny model
    assert torch.equal(torch.random.get_rng_state(), before)   # the caller's random numbers untouched
    assert e.seconds_per_step > 0 and e.steps == 100 and e.measured_batch == 8
    assert e.total_seconds == pytest.approx(100 * e.seconds_per_step)
    half = estimate.estimate_run_time(cfg, start=50)
    assert half.steps == 50 and half.total_seconds == pytest.approx(50 * half.seconds_per_step)


def _fake_slow(monkeypatch, seconds_per_image):
    """Every timed step sleeps in proportion to its batch: the estimate must find that rate."""
    def stepper(cfg, batch, device, captions):
        return lambda step, g: time.sleep(seconds_per_image * batch)
    monkeypatch.setattr(estimate, "_stepper", stepper)


def test_a_slow_step_is_timed_at_a_smaller_batch_and_scaled(monkeypatch):
    _fake_slow(monkeypatch, 0.004)
    e = estimate.estimate_run_time(_tiny_config(batch=64), budget_s=0.3)
    assert 8 <= e.measured_batch < 64                          # 3 steps at 64 (0.77 s) overrun the budget
    assert estimate.estimate_run_time(_tiny_config(batch=64), budget_s=0.01).measured_batch == 8   # never under 8
    assert e.seconds_per_step == pytest.approx(64 * 0.004, rel=0.25)
    fast = estimate.estimate_run_time(_tiny_config(batch=16), budget_s=3.0)
    assert fast.measured_batch == 16                           # within the budget: the configured batch itself


def test_cli_prints_steps_times_the_step_time(monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_ESTIMATE", "1")
    _fake_slow(monkeypatch, 0.01)
    r = CliRunner().invoke(main, ["train", "--data", "digits", "--preset", "tiny8", "--batch-size", "16",
                                  "--train-steps", "500", "--device", "cpu", "--out", "unused", "--dry-run"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = re.search(r"about ([\d.]+) s/step here \(cpu, batch 16: [\d.]+ img/s\): 500 steps ~ ([\d.]+) (s|min)", r.output)
    assert m, r.output
    per_step, total = float(m.group(1)), float(m.group(2)) * (60 if m.group(3) == "min" else 1)
    assert per_step == pytest.approx(0.16, rel=0.25)
    # the total is steps x the step time, up to the printed rounding (2 significant digits, whole units)
    assert abs(total - 500 * per_step) <= 500 * 0.005 + (30 if m.group(3) == "min" else 0.5)
    off = CliRunner().invoke(main, ["train", "--data", "digits", "--preset", "tiny8", "--out", "unused",
                                    "--dry-run", "--no-estimate"], catch_exceptions=False)
    assert "s/step" not in off.output


@pytest.fixture(scope="module")
def colour32(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour32")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _count(cfg):
    with torch.device("meta"):
        return UNet(cfg).num_parameters()


def test_32x32_colour_gets_the_lean_layout_on_a_cpu_and_ddpms_on_a_gpu(colour32, monkeypatch):
    from diffusekit.training import resolve
    cpu, _ = resolve_run_config({"data.source": str(colour32), "train.device": "cpu"})
    lean, big = UNetConfig.preset("cifar32-lean"), UNetConfig.preset("cifar32")
    assert (cpu.model.base_channels, cpu.model.num_res_blocks, cpu.model.attention_resolutions) == (64, 1, (8,))
    assert _count(cpu.model) == _count(lean) == 6_491_011
    assert _count(big) > 5 * _count(lean)
    named, _ = resolve_run_config({"data.source": str(colour32), "train.device": "cpu"}, preset="cifar32")
    assert (named.model.base_channels, named.model.num_res_blocks) == (128, 2)
    # on CUDA (faked: only the device's type is read) the default stays DDPM's CIFAR-10 layout
    monkeypatch.setattr(resolve, "resolve_device", lambda name: torch.device("cuda"))
    gpu, _ = resolve_run_config({"data.source": str(colour32)})
    assert (gpu.model.base_channels, gpu.model.channel_mult, gpu.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert estimate.bigger_preset(cpu.model, "cpu") == "cifar32" and estimate.bigger_preset(gpu.model, "cpu") is None


def test_an_old_32x32_run_keeps_its_layout(colour32):
    old, _ = resolve_run_config({"data.source": str(colour32)}, preset="cifar32")
    again, _ = resolve_run_config({"train.device": "cpu", "train.steps": 10}, base=old)
    assert again.model == old.model


def test_a_noisy_probe_never_sends_a_slow_model_to_the_full_batch():
    # the batch-2 step timed slower than the batch-8 one (a busy machine): no slope, yet 64 images cost 8x more
    assert estimate._batch_within((2, 1.0), (8, 0.9), 64, 1.0) < 64
    assert estimate._batch_within((2, 0.01), (8, 0.02), 64, 1.0) == 64
