"""Training: loss and weighting against closed forms, end to end on tiny UNets, resume, DDP, errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from diffusekit import store as ckpt
from diffusekit.training import diffusion as train_mod
from diffusekit.config import ConfigError
from diffusekit.data import DataConfig
from diffusekit.nn.unet import UNetConfig
from diffusekit.schedule import NoiseSchedule, ScheduleConfig
from diffusekit.training.ema import EMA
from diffusekit.training.loop import TrainingDiverged, lr_at
from diffusekit.store.run_config import RunConfig, TrainConfig
from diffusekit.store.run import load_run
from diffusekit.training.losses import diffusion_loss, loss_weights
from diffusekit.training import train




def tiny_run(num_classes: int = 10, prediction_type: str = "epsilon", **train_kw) -> RunConfig:
    """A UNet with a handful of channels on 8x8 digits; a step takes milliseconds."""
    model = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), num_heads=2, groups=4, num_classes=num_classes,
                       prediction_type=prediction_type)
    # fp32: the exact-equality tests (resume, grad accumulation, processes) compare at fp32 rounding
    kw = dict(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, log_every=5, save_every=10, sample_every=0,
              num_sample_images=10, sample_steps=4, device="cpu", precision="fp32")
    return RunConfig(model=model, schedule=ScheduleConfig(num_train_timesteps=100),
                     data=DataConfig(class_labels=num_classes > 0), train=TrainConfig(**{**kw, **train_kw}))


# --- the loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_match_closed_form(prediction_type):
    sched = NoiseSchedule.create("linear")
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    gamma = 5.0
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    # Hang et al. 2023: eps: min(SNR, g) / SNR, v: min(SNR, g) / (SNR + 1), x0: min(SNR, g)
    expected = {"epsilon": torch.minimum(snr, torch.full_like(snr, gamma)) / snr,
                "v_prediction": torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1),
                "sample": torch.minimum(snr, torch.full_like(snr, gamma))}[prediction_type]
    w = loss_weights(sched, t, prediction_type, "min_snr", gamma)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    assert torch.equal(loss_weights(sched, t, prediction_type, "none"), torch.ones(6, dtype=torch.float64))
    # zero terminal SNR: the eps weight tends to 1, not 0/0
    zsnr = NoiseSchedule.create("linear", rescale_zero_terminal_snr=True)
    assert torch.isfinite(loss_weights(zsnr, torch.tensor([999]), prediction_type, "min_snr")).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_is_zero_for_an_oracle(prediction_type):
    """A model that outputs the exact target (computed from x0 it peeks at) has loss 0."""
    sched = NoiseSchedule.create("cosine", num_train_timesteps=50)
    x0 = torch.rand(6, 1, 4, 4, dtype=torch.float64) * 2 - 1

    def oracle(x_t, t):
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[
            prediction_type]
    for weighting in ("none", "min_snr"):
        loss = diffusion_loss(oracle, sched, x0, prediction_type, torch.Generator().manual_seed(0), weighting)
        assert loss.item() < 1e-12
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), sched, x0, "sample", torch.Generator().manual_seed(0))
    torch.testing.assert_close(zero.double(), x0.pow(2).mean(), rtol=1e-6, atol=0)


def test_loss_reproducible_with_generator():
    sched = NoiseSchedule.create("linear", num_train_timesteps=100)
    x0 = torch.randn(8, 1, 4, 4)

    def model(x, t):
        return x * 0.5 + t.view(-1, 1, 1, 1) / 100
    a = diffusion_loss(model, sched, x0, "epsilon", torch.Generator().manual_seed(3))
    b = diffusion_loss(model, sched, x0, "epsilon", torch.Generator().manual_seed(3))
    c = diffusion_loss(model, sched, x0, "epsilon", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ema_and_lr_schedule_closed_forms():
    p = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.ParameterList([p])
    ema = EMA(model, decay=0.9, warmup=True)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(model)                      # decay_0 = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.model[0].data, torch.full((3,), 0.9))
    ema.update(model)                      # decay_1 = min(0.9, 2/11)
    torch.testing.assert_close(ema.model[0].data, torch.full((3,), 1 - 0.1 * 2 / 11))
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.5) and lr_at(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="constant"), 500) == 1.0


def test_run_config_json_round_trip(tmp_path):
    cfg = tiny_run(prediction_type="v_prediction", loss_weighting="min_snr")
    path = tmp_path / "run.json"
    cfg.to_json(path)
    back = RunConfig.from_json(path)
    assert back == cfg and back.diff(cfg) == {}
    assert isinstance(back.model.channel_mult, tuple) and isinstance(back.train, TrainConfig)


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_loss_and_writes_the_run(tmp_path):
    cfg = tiny_run(steps=60, batch_size=64, lr=3e-3, warmup_steps=5, log_every=10, save_every=30,
                   sample_every=30)
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert set(records[0]) >= {"step", "loss", "lr", "images_per_s", "time"}
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    for name in ("config.json", "model.safetensors", "model_raw.safetensors", "trainer_state.pt", "loss.png",
                 "samples/step_000030.png", "samples/step_000060.png"):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["class_names"] == [str(i) for i in range(10)]

    # save -> load gives identical outputs (EMA and raw weights)
    cfg2, model, extra = load_run(run)
    assert extra["step"] == 60 and extra["class_names"][3] == "3"
    assert cfg2.model == cfg.model and cfg2.train == cfg.train and cfg2.schedule == cfg.schedule
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([1.0, 20.0, 50.0, 99.0]), torch.tensor([0, 3, -1, 9])
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=y), result.ema_model(x, t, class_labels=y))
        _, raw, _ = load_run(run, weights="raw")
        assert torch.equal(raw(x, t, class_labels=y), result.model.eval()(x, t, class_labels=y))


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """SIGKILL a real training process after its first checkpoint, resume, compare bit for bit."""
    cfg = tiny_run(steps=30, save_every=5, log_every=5, class_dropout=0.2, ema_decay=0.99)
    cfg.to_json(tmp_path / "run.json")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "diffusekit.train", "--config", str(tmp_path / "run.json"),
                             "--out", str(killed), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not (killed / ckpt.STATE_FILE).exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint within 60 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    killed_at = ckpt.read_trainer_state(killed)["step"]
    assert 5 <= killed_at < 30

    resumed = train(cfg, killed, resume=True, progress=False)
    straight = train(cfg, tmp_path / "straight", progress=False)
    assert resumed.step == straight.step == 30
    for name in (ckpt.EMA_FILE, ckpt.RAW_FILE):
        a, b = load_file(killed / name), load_file(tmp_path / "straight" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = ckpt.read_trainer_state(killed), ckpt.read_trainer_state(tmp_path / "straight")
    for i, s in sa["optimizer"]["state"].items():
        assert all(torch.equal(s[k], sb["optimizer"]["state"][i][k]) for k in s)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 31, 5))          # records past the checkpoint were dropped on resume


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    real_loss = train_mod.diffusion_loss

    def nan_at_step_7(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 7 else loss
    monkeypatch.setattr(train_mod, "diffusion_loss", nan_at_step_7)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(tiny_run(steps=20, save_every=3), run, progress=False)
    assert "nan at step 7" in str(e.value) and str(run) in str(e.value) and "(step 6)" in str(e.value)
    assert e.value.step == 7 and e.value.saved_step == 6
    _, model, extra = load_run(run)
    assert extra["step"] == 6 and all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_lr_diverges_with_clear_error(tmp_path):
    with pytest.raises(TrainingDiverged, match="no checkpoint had been saved yet"):
        train(tiny_run(steps=20, lr=1e30, warmup_steps=0, grad_clip=0.0, save_every=50), tmp_path / "r",
              progress=False)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    cfg = tiny_run(steps=6, batch_size=32, save_every=3, log_every=2, sample_every=6)
    cfg.to_json(tmp_path / "run.json")
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys\n"
        "from safetensors.torch import save_file\n"
        "from diffusekit.store.run_config import RunConfig\nfrom diffusekit.training import train\n"
        "r = train(RunConfig.from_json(sys.argv[1]), sys.argv[2], progress=False)\n"
        "sd = {k: v.contiguous() for k, v in r.model.state_dict().items()}\n"
        "save_file(sd, os.path.join(sys.argv[2], 'rank%s.safetensors' % os.environ['RANK']))\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "run.json"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1, saved = (load_file(out / n) for n in ("rank0.safetensors", "rank1.safetensors", ckpt.RAW_FILE))
    assert all(torch.equal(r0[k], r1[k]) and torch.equal(r0[k], saved[k]) for k in r0)
    state = ckpt.read_trainer_state(out)
    assert state["step"] == 6 and state["world_size"] == 2
    assert (out / "samples" / "step_000006.png").exists() and (out / "loss.png").exists()
    _, model, extra = load_run(out)
    assert extra["step"] == 6


# --- errors -----------------------------------------------------------------------------------------


def test_config_and_checkpoint_mismatch_messages(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run(steps=4, save_every=4)
    train(cfg, run, progress=False)

    # a second run into the same folder, without resume
    with pytest.raises(ckpt.CheckpointError, match="already holds a checkpoint at step 4; pass resume=True"):
        train(cfg, run, progress=False)
    # resume with different settings lists the fields; steps may change
    other = RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "lr": 0.5, "seed": 3}})
    with pytest.raises(ConfigError, match=r"(?s)train.lr: checkpoint has 0.002, now 0.5.*train.seed"):
        train(other, run, resume=True, progress=False)
    more = RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "steps": 6}})
    assert train(more, run, resume=True, progress=False).step == 6

    # config.json edited so it no longer matches the weights
    config = json.loads((run / "config.json").read_text())
    config["model"]["base_channels"] = 16
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="model.base_channels: config.json has 16, the weights were "
                                                   "trained with 8"):
        load_run(run)
    # an unknown key names the key
    config["model"]["base_channels"] = 8
    config["train"]["learning_rate"] = 1.0
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json: unknown key 'learning_rate' in TrainConfig"):
        load_run(run)
    del config["train"]["learning_rate"]
    (run / "config.json").write_text(json.dumps(config))
    (run / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_run(run)


def test_data_and_model_validation(tmp_path):
    with pytest.raises(ConfigError, match="the data has 10 classes but model.num_classes=7; set "
                                          "model.num_classes=10"):
        train(tiny_run(num_classes=7), tmp_path / "a", progress=False)
    cfg = tiny_run()
    cfg.data.class_labels = False
    with pytest.raises(ConfigError, match="model.num_classes=10 but the data has no labels"):
        train(cfg, tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="data.image_size=16 but model.image_size=8"):
        RunConfig(model=tiny_run().model, data=DataConfig(image_size=16))
    with pytest.raises(ConfigError, match="image_size=10 is not divisible by 4"):
        UNetConfig.preset("tiny8", image_size=10)
    with pytest.raises(ConfigError, match="fewer than batch_size=4000; set batch_size to at most 1797"):
        train(tiny_run(batch_size=4000), tmp_path / "d", progress=False)
    # class_dropout with an unconditional model is ignored: it trains
    result = train(tiny_run(num_classes=0, steps=2, class_dropout=0.3), tmp_path / "c", progress=False)
    assert result.step == 2 and json.loads((tmp_path / "c" / "config.json").read_text())["class_names"] == []
