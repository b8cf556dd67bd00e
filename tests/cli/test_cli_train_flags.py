"""Warm-up, lr schedule, weight decay, gradient clipping and EMA are `train` flags (not only --config JSON),
and --dry-run shows them."""
import json

from click.testing import CliRunner

from diffusekit.cli import main
from diffusekit.store.run_config import TrainConfig

BASE = ["train", "--data", "digits", "--preset", "tiny8", "--dry-run"]
FLAGS = {"--warmup-steps": ("warmup_steps", "7"), "--lr-schedule": ("lr_schedule", "constant"),
         "--weight-decay": ("weight_decay", "0.05"), "--grad-clip": ("grad_clip", "0"),
         "--ema-decay": ("ema_decay", "0.9")}


def dry_run(tmp_path, *args):
    r = CliRunner().invoke(main, [*BASE, "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["train"]


def test_flags_reach_the_config_and_dry_run_shows_them(tmp_path):
    defaults = dry_run(tmp_path)
    fields = TrainConfig.__dataclass_fields__
    assert {k: defaults[k] for k, _ in FLAGS.values()} == {k: fields[k].default for k, _ in FLAGS.values()}
    given = dry_run(tmp_path, *[x for flag, (_, v) in FLAGS.items() for x in (flag, v)], "--no-ema-warmup")
    assert given["warmup_steps"] == 7 and given["lr_schedule"] == "constant" and given["weight_decay"] == 0.05
    assert given["grad_clip"] == 0 and given["ema_decay"] == 0.9 and given["ema_warmup"] is False
    assert defaults["ema_warmup"] is True and not (tmp_path / "run").exists()       # a dry run writes nothing


def test_flags_override_a_config_file(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"train": {"ema_decay": 0.99, "weight_decay": 0.1}}))
    train = dry_run(tmp_path, "--config", str(cfg), "--ema-decay", "0.5")
    assert train["ema_decay"] == 0.5 and train["weight_decay"] == 0.1


def test_out_of_range_values_exit_2_naming_the_flag(tmp_path):
    for flag, bad in (("--ema-decay", "1"), ("--grad-clip", "-1"), ("--warmup-steps", "-3"), ("--weight-decay", "-0.1")):
        r = CliRunner().invoke(main, [*BASE, "--out", str(tmp_path / "run"), flag, bad])
        assert r.exit_code == 2 and flag in r.output, (flag, r.output)
