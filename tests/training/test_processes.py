"""The launcher's settings in the torchrun / accelerate entry point (`python -m diffusekit.train`):
ACCELERATE_MIXED_PRECISION (what `accelerate launch --mixed_precision X` sets in every process) and
--resume with a step or a path. No real launch: the variable is set here as accelerate sets it."""
import json

import pytest
import torch
from safetensors.torch import load_file

from diffusekit import store as ckpt
from diffusekit.config import ConfigError
from diffusekit.train import main
from diffusekit.training.processes import launcher_precision
from diffusekit.training.resolve import resolve_run_config

TINY = {"data.source": "digits", "model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
        "model.groups": 4, "model.attention_resolutions": (), "model.num_heads": 2, "train.batch_size": 8,
        "train.warmup_steps": 1, "train.sample_every": 0, "train.log_every": 1, "train.device": "cpu",
        "train.steps": 4, "train.save_every": 2, "train.checkpoints_total_limit": 0}


@pytest.mark.parametrize("mixed,expected", [("no", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("BF16", "bf16")])
def test_accelerate_precision_fills_auto(mixed, expected):
    env = {"ACCELERATE_MIXED_PRECISION": mixed}
    assert launcher_precision("auto", env) == expected
    assert launcher_precision(expected, env) == expected                  # agreeing settings pass
    assert launcher_precision("auto", {}) == "auto" and launcher_precision("fp32", {}) == "fp32"   # no launcher


def test_accelerates_default_no_keeps_a_chosen_precision():
    # accelerate launch sets "no" also when --mixed_precision is not given: only "auto" follows it
    assert launcher_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "no"}) == "bf16"


def test_accelerate_precision_conflicts_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"--mixed_precision bf16 .*train.precision='fp32'.*\"auto\"") as error:
        launcher_precision("fp32", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8 .*no / bf16 / fp16"):
        launcher_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp8"})


def _config_file(tmp_path, **extra):
    cfg, _ = resolve_run_config({**TINY, **extra})
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    return str(path)


def test_entry_point_trains_in_the_launchers_precision_and_resumes_from_a_step_or_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = _config_file(tmp_path)                 # precision "auto"
    run = tmp_path / "run"
    assert main(["--config", config, "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16"
    straight = load_file(run / ckpt.EMA_FILE)
    assert main(["--config", config, "--out", str(run), "--no-progress", "--resume", "2"]) == 0   # steps 3..4 redone
    redone = load_file(run / ckpt.EMA_FILE)
    assert straight.keys() == redone.keys() and all(torch.equal(straight[k], redone[k]) for k in straight)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at step 3"):
        main(["--config", config, "--out", str(run), "--no-progress", "--resume", "3"])
    with pytest.raises(ckpt.CheckpointError, match="nowhere holds no"):
        main(["--config", config, "--out", str(run), "--no-progress", "--resume", str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match="train.precision='fp32'"):
        main(["--config", _config_file(tmp_path, **{"train.precision": "fp32"}), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
