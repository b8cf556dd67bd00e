"""--report-to wandb: a tiny run logs to an offline Weights & Biases run the same numbers as its metrics.jsonl.

The offline run is read back from its .wandb file (W&B's record log: a 7-byte file header, then 32 KiB
blocks of records, each with a 7-byte header of CRC, length and chunk type, holding protobuf Records),
so the test checks what wandb wrote to disk, not what we handed it. WANDB_MODE=offline: no network.
"""
import json
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from diffusekit.cli import main
from diffusekit.config import ConfigError
from diffusekit.training import train
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training.tracking import Tracker

TINY = {"data.source": "digits", "model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
        "model.groups": 4, "model.attention_resolutions": (), "model.num_heads": 2, "train.batch_size": 16,
        "train.warmup_steps": 2, "train.log_every": 1, "train.device": "cpu"}

FULL, LAST = 1, 4           # chunk types of a record that ends in this chunk (leveldb log format)


def wandb_records(path: Path, block: int = 32768):
    """The protobuf Records of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:            # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):
            break                               # the end, or a record still being written
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(log_file: Path, timeout: float = 60.0) -> list:
    """The records of a finished run. wandb.finish() returns once wandb-core has the exit record, and its
    writer may flush the file a moment later: wait for the exit record (the run's last) on disk."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(log_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_history(wandb_dir: Path) -> tuple[dict, dict[int, dict]]:
    """(the run's config, {step: {key: value}}) of the one offline run under wandb_dir."""
    (log_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, history = {}, {}
    for record in finished_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return config, history


@pytest.mark.slow
def test_wandb_offline_run_holds_the_runs_own_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="--report-to wandb needs the wandb extra: pip install -e \".[wandb]\"")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    (tmp_path / "wb").mkdir()
    cfg, data = resolve_run_config({**TINY, "train.steps": 3, "train.save_every": 3, "train.report_to": "wandb",
                                    "train.sample_every": 3, "train.num_sample_images": 4, "train.sample_steps": 2})
    train(cfg, tmp_path / "r", dataset=data, progress=False)

    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    config, history = offline_history(tmp_path / "wb")
    own = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(own) == [1, 2, 3]
    assert {step: h["loss"] for step, h in history.items() if "loss" in h} == pytest.approx(own, rel=1e-12)
    assert history[3]["lr"] == pytest.approx(records[-1]["lr"], rel=1e-12)
    # the sample grid of step 3 went along as an image, and the run carries the run's config
    grid = Image.open(tmp_path / "r" / "samples" / "step_000003.png")
    assert history[3]["samples/_type"] == "image-file"
    assert (history[3]["samples/width"], history[3]["samples/height"]) == grid.size
    assert config["train"]["report_to"] == "wandb" and config["model"]["base_channels"] == 8
    assert not (tmp_path / "r" / "wandb").exists()      # WANDB_DIR was honoured


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)      # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r'wandb package: pip install -e "\.\[wandb\]"'):
        Tracker(tmp_path, 0, "wandb")
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--data", "digits", "--preset", "tiny8",
                                  "--train-steps", "2", "--batch-size", "8", "--sample-every", "0",
                                  "--report-to", "wandb"])
    assert r.exit_code == 2 and '".[wandb]"' in r.output, r.output
