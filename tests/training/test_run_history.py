"""Checkpoint history, resuming from an earlier checkpoint, the model card, tracking and periodic FD/KID."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from diffusekit import store as ckpt
from diffusekit.cli import main
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training import train

TINY = {"data.source": "digits", "model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
        "model.groups": 4, "model.attention_resolutions": (), "model.num_heads": 2, "train.batch_size": 16,
        "train.warmup_steps": 2, "train.sample_every": 0, "train.log_every": 1, "train.device": "cpu"}


def run_config(**extra):
    return resolve_run_config({**TINY, **extra})


def test_history_keeps_the_newest_checkpoints_and_resume_from_a_step_equals_the_straight_run(tmp_path):
    cfg, data = run_config(**{"train.steps": 8, "train.save_every": 2, "train.checkpoints_total_limit": 2})
    straight = train(cfg, tmp_path / "a", dataset=data, progress=False)
    assert [s for s, _ in ckpt.checkpoint_history(tmp_path / "a")] == [6, 8]      # the newest two
    # resume from checkpoint-6 of run a, copied: the steps 7..8 are redone and equal the straight run
    cfg2, _ = run_config(**{"train.steps": 8, "train.save_every": 2, "train.checkpoints_total_limit": 0})
    train(cfg2, tmp_path / "b", dataset=data, progress=False)
    assert [s for s, _ in ckpt.checkpoint_history(tmp_path / "b")] == [2, 4, 6, 8]
    redone = train(cfg2, tmp_path / "b", resume=True, resume_from=4, dataset=data, progress=False)
    assert redone.step == 8
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, redone.model.state_dict()[key]), key
    metrics = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))       # records after step 4 were replaced
    # the history folders are consistent saves: weights and state of the same step
    old = tmp_path / "b" / "checkpoint-2"
    assert int(load_file(old / ckpt.EMA_FILE) is not None) and ckpt.read_trainer_state(old, False)["step"] == 2
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at step 3"):
        train(cfg2, tmp_path / "b", resume=True, resume_from=3, dataset=data, progress=False)


def test_model_card_and_tracking(tmp_path):
    pytest.importorskip("tensorboard")
    cfg, data = run_config(**{"train.steps": 4, "train.save_every": 4, "train.report_to": "tensorboard",
                              "train.eval_every": 2, "train.eval_samples": 16, "train.sample_every": 4,
                              "train.num_sample_images": 4, "train.sample_steps": 2})
    train(cfg, tmp_path / "r", dataset=data, progress=False)
    card = (tmp_path / "r" / "README.md").read_text()
    assert "dk.Pipeline.load" in card and "samples/step_000004.png" in card and "digits" in card
    assert card.startswith("---\nlibrary_name: diffusekit") or card.startswith('---\nlicense: "cc-by-4.0"')
    assert str(tmp_path) not in card
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fd" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["fd"] > 0 for r in evals)
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_resume_step_overwrite_and_bad_limits(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--data", "digits", "--batch-size", "16", "--sample-every", "0",
            "--save-every", "2", "--train-steps", "4", "--preset", "tiny8"]
    runner = CliRunner()
    assert runner.invoke(main, base).exit_code == 0
    r = runner.invoke(main, ["train", "--out", str(out), "--resume", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, base)                                  # a run is there: refuse without a flag
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(main, base + ["--overwrite"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, base[:3] + ["--checkpoints-total-limit", "-1"])
    assert r.exit_code == 2 and "checkpoints-total-limit" in r.output
    r = runner.invoke(main, base[:3] + ["--grad-accum", "0"])
    assert r.exit_code == 2 and "grad-accum" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = runner.invoke(main, ["train", "--out", str(tmp_path / "other"), "--overwrite", "--train-steps", "1"])
    assert r.exit_code == 2 and "not a diffusekit run" in r.output and (tmp_path / "other" / "notes.txt").exists()
