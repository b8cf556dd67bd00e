"""Run-directory checkpoints: atomic saves, recovery of interrupted saves, checked loads."""
import os
import pytest

import torch

from diffusekit import store as ckpt


def _weights(value: float) -> dict:
    return {"a.weight": torch.full((3, 2), value), "b.bias": torch.arange(4.0) + value}


def _save(run_dir, step, value):
    ckpt.save_checkpoint(run_dir, step, ema=_weights(value), raw=_weights(-value),
                         trainer_state={"optimizer": {"state": {0: {"exp_avg": torch.ones(2) * value}},
                                                      "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
                                        "nested": [1, 2.5, "x", None]},
                         config_json='{"v": %d}\n' % step, metadata={"note": "hi"})


def _assert_checkpoint(run_dir, step, value):
    state = ckpt.read_trainer_state(run_dir)
    assert state["step"] == step
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    ema, meta = ckpt.read_weights(run_dir / ckpt.EMA_FILE)
    raw, raw_meta = ckpt.read_weights(run_dir / ckpt.RAW_FILE)
    assert meta == {"note": "hi", "step": str(step), "weights": "ema"} and raw_meta["weights"] == "raw"
    assert torch.equal(ema["a.weight"], _weights(value)["a.weight"])
    assert torch.equal(raw["b.bias"], _weights(-value)["b.bias"])
    assert ckpt.read_config_json(run_dir) == {"v": step}
    assert not (run_dir / ckpt.TMP_DIR).exists() and not (run_dir / ckpt.READY_DIR).exists()


def test_save_and_read_round_trip(tmp_path):
    _save(tmp_path, 7, 1.5)
    _assert_checkpoint(tmp_path, 7, 1.5)
    _save(tmp_path, 9, 2.5)
    _assert_checkpoint(tmp_path, 9, 2.5)
    assert ckpt.has_checkpoint(tmp_path) and not ckpt.has_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("where", ["save_file", "torch_save"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    _save(tmp_path, 3, 1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    if where == "save_file":
        calls = []
        real = ckpt.save_file

        def second_fails(*args, **kwargs):        # the EMA file is written, then the raw one fails
            calls.append(1)
            return real(*args, **kwargs) if len(calls) == 1 else boom()
        monkeypatch.setattr(ckpt.files, "save_file", second_fails)
    else:
        monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 4, 2.0)
    monkeypatch.undo()
    assert not (tmp_path / ckpt.TMP_DIR).exists()  # the half-written save is cleaned up ...
    _assert_checkpoint(tmp_path, 3, 1.0)           # ... and the previous checkpoint is intact
    _save(tmp_path, 5, 3.0)
    _assert_checkpoint(tmp_path, 5, 3.0)


def test_interrupted_commit_rolls_forward(tmp_path, monkeypatch):
    _save(tmp_path, 3, 1.0)
    real_replace = os.replace
    moved = []

    def crash_after_two(src, dst):                 # the folder rename, then one file, then "kill"
        if len(moved) == 2:
            raise KeyboardInterrupt("killed (simulated)")
        moved.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, 2.0)
    monkeypatch.undo()
    # config.json is new, the weights and state old: a mix that recover() must complete
    assert (tmp_path / ckpt.READY_DIR).is_dir()
    _assert_checkpoint(tmp_path, 4, 2.0)


def test_step_mismatch_between_files_is_an_error(tmp_path):
    _save(tmp_path, 3, 1.0)
    other = tmp_path / "other"
    _save(other, 8, 1.0)
    (other / ckpt.EMA_FILE).replace(tmp_path / ckpt.EMA_FILE)
    with pytest.raises(ckpt.CheckpointError, match="step 8 .* step 3"):
        ckpt.read_trainer_state(tmp_path)


def test_missing_file_is_named(tmp_path):
    _save(tmp_path, 3, 1.0)
    (tmp_path / ckpt.RAW_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model_raw.safetensors is missing"):
        ckpt.read_trainer_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="trainer_state.pt is missing"):
        ckpt.read_trainer_state(tmp_path / "empty")


def test_state_dict_mismatch_lists_keys_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["0.weight"] = torch.zeros(4, 2)
    del sd["1.bias"]
    sd["extra"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_state_dict_checked(model, sd, "w.safetensors")
    msg = str(e.value)
    assert "1.bias" in msg and "extra" in msg and "0.weight: file has shape (4, 2), model has (3, 2)" in msg
