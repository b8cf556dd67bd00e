"""Reliability: non-finite and mistyped config values, the one-writer run lock, readers during a
save, content hashes and finiteness of weights, damaged files, and OS errors during saves."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as plain_save_file

from diffusekit import store as ckpt
from diffusekit.config import Config, ConfigError, check_finite, check_range
from diffusekit.schedule import ScheduleConfig


# ---------------------------------------------------------------------------------------------
# configs


@dataclass
class Tiny(Config):
    rate: float = 0.1            # checked by validate()
    scale: float | None = None   # not checked by validate(): the base class still refuses NaN/inf

    def validate(self) -> None:
        check_range("rate", self.rate, lo=0, lo_open=True)


@dataclass
class Outer(Config):
    sub: Tiny = field(default_factory=Tiny)
    sizes: tuple[int, ...] = (1, 2)
    name: str = "x"
    count: int = 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(bad):
    check_range("rate", 0.5, lo=0, hi=1)                       # the check passes finite values
    with pytest.raises(ConfigError, match=r"rate=(nan|inf|-inf) is not a finite number; give a finite value "
                                          r"in \(0, inf\)"):
        Tiny(rate=bad)
    with pytest.raises(ConfigError, match="scale=.* is not a finite number"):
        Tiny(scale=bad)
    with pytest.raises(ConfigError, match="beta_end=.* is not a finite number.*in \\(0, 1\\)"):
        ScheduleConfig(beta_end=bad)
    with pytest.raises(ConfigError, match="not a number"):
        check_finite("rate", "0.1")
    cfg = Tiny()
    cfg.rate = bad                                             # set after validation: JSON refuses it
    with pytest.raises(ConfigError, match="non-finite values {'rate'"):
        cfg.to_json()


@pytest.mark.parametrize("data, message", [
    ({"sub": 5}, r"sub: expected an object of Tiny fields \(rate, scale\), got 5 \(an integer\)"),
    ({"sub": [1]}, r"sub: expected an object of Tiny fields .*got \[1\] \(a list\)"),
    ({"sub": {"rate": "0.1"}}, r"sub.rate: expected a number, got '0.1' \(a string\)"),
    ({"sub": {"scale": [1.0]}}, r"sub.scale: expected a number or null, got \[1.0\]"),
    ({"sizes": "12"}, r"sizes: expected a list of integers, got '12'"),
    ({"sizes": [1, 2.5]}, r"sizes: expected a list of integers"),
    ({"name": 3}, r"name: expected a string, got 3"),
    ({"count": 1.5}, r"count: expected an integer, got 1.5"),
    ({"count": True}, r"count: expected an integer, got True \(true/false\)"),
])
def test_wrong_types_name_the_key_and_the_type(data, message):
    with pytest.raises(ConfigError, match=message):
        Outer.from_dict(data)


def test_from_dict_still_round_trips_and_converts_json_forms():
    cfg = Outer(sub=Tiny(rate=0.5, scale=2.0), sizes=(3, 4), name="y", count=7)
    assert Outer.from_dict(json.loads(cfg.to_json())) == cfg
    back = Outer.from_dict({"sizes": [5], "count": 2000.0, "sub": {"rate": 1}})
    assert back.sizes == (5,) and back.count == 2000 and isinstance(back.count, int) and back.sub.rate == 1.0
    with pytest.raises(ConfigError, match=r"num_train_timesteps: expected an integer"):
        ScheduleConfig.from_dict({"num_train_timesteps": "1000"})


def test_from_json_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{\n  "name": "a",\n  "count": 3,\n}\n')
    with pytest.raises(ConfigError, match=rf"{path} is not valid JSON: .* at line 4"):
        Outer.from_json(path)
    path.write_text('{"sub": {"rate": NaN}}')
    with pytest.raises(ConfigError, match=rf"{path}: rate=nan is not a finite number"):
        Outer.from_json(path)
    path.write_text('{"sub": 5}')
    with pytest.raises(ConfigError, match=rf"{path}: sub: expected an object"):
        Outer.from_json(path)
    with pytest.raises(ConfigError, match=rf"cannot read the config file {tmp_path / 'nope.json'}"):
        Outer.from_json(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# checkpoints: helpers


def _weights(value: float, n: int = 4) -> dict:
    return {"a.weight": torch.full((n, n), float(value)), "b.bias": torch.arange(4.0) + value}


def _save(run_dir, step, **kw):
    ckpt.save_checkpoint(run_dir, step, ema=_weights(step), raw=_weights(-step),
                         trainer_state={"optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
                         config_json='{"saved_at": %d}\n' % step, metadata={"note": "hi"}, **kw)


def _assert_one_save(c: ckpt.Checkpoint, step: int):
    assert c.step == step and c.config == {"saved_at": step}
    ema, meta = c.weights[ckpt.EMA_FILE]
    assert torch.equal(ema["a.weight"], _weights(step)["a.weight"]) and meta["step"] == str(step)
    if ckpt.RAW_FILE in c.weights:
        assert torch.equal(c.weights[ckpt.RAW_FILE][0]["b.bias"], _weights(-step)["b.bias"])
    if c.trainer_state is not None:
        assert c.trainer_state["step"] == step


HOLDER = """
import sys
from diffusekit.store import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def _hold_lock_in_another_process(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line == "locked", f"the lock holder did not start: {line!r}"
    return proc


# ---------------------------------------------------------------------------------------------
# the one-writer lock and readers


def test_second_writer_is_refused_and_readers_still_read(tmp_path):
    run = tmp_path / "run"
    _save(run, 3)
    (run / ckpt.TMP_DIR).mkdir()               # as if the holder were in the middle of a save
    proc = _hold_lock_in_another_process(run)
    try:
        msg = rf"{run} is being trained by process {proc.pid}; wait for it to finish or use another --out"
        with pytest.raises(ckpt.RunLockedError, match=msg) as info:
            ckpt.RunLock(run).acquire()
        assert info.value.pid == proc.pid
        with pytest.raises(ckpt.RunLockedError, match=msg):
            _save(run, 4)
        with pytest.raises(ckpt.RunLockedError, match=msg):
            ckpt.recover(run)
        # readers read the committed checkpoint and leave the writer's folders alone
        assert ckpt.read_trainer_state(run)["step"] == 3
        assert ckpt.has_checkpoint(run)
        _assert_one_save(ckpt.read_checkpoint(run, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True), 3)
        assert (run / ckpt.TMP_DIR).is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)       # the kernel drops the lock of a killed process
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    with ckpt.RunLock(run) as lock:
        assert lock.held and (run / ckpt.LOCK_FILE).read_text().strip() == str(os.getpid())
        assert ckpt.recover(run, lock=lock) == "discarded"
    _save(run, 4)
    assert ckpt.read_trainer_state(run, finish_interrupted=False)["step"] == 4


def test_lock_in_this_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with ckpt.RunLock(run) as lock:
        with pytest.raises(ckpt.RunLockedError, match=f"process {os.getpid()} \\(this process"):
            ckpt.RunLock(run).acquire()
        _save(run, 1)                            # uses the lock this process holds
        _save(run, 2, lock=lock)
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(ValueError, match="does not hold"):
            ckpt.recover(run, lock=ckpt.RunLock(other))
    assert not lock.held and (run / ckpt.LOCK_FILE).read_text() == ""
    with ckpt.RunLock(run):                      # released after the with-block
        pass
    assert ckpt.read_trainer_state(run)["step"] == 2


def _half_moved_save(run, monkeypatch, step):
    """Save `step`, then "kill" the save after the commit rename and one file move (config.json)."""
    real_replace = os.replace
    moved = []

    def crash_after_two(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed (simulated)")
        moved.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _save(run, step)
    monkeypatch.undo()


def test_reader_in_the_move_window_sees_one_save(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 3)
    _half_moved_save(run, monkeypatch, 4)
    ready = run / ckpt.READY_DIR
    in_ready = sorted(os.listdir(ready))
    assert in_ready == sorted([ckpt.EMA_FILE, ckpt.RAW_FILE, ckpt.STATE_FILE])
    # the top level alone is a mix of two saves: the check below can fail
    assert ckpt.read_config_json(run) == {"saved_at": 4}
    assert ckpt.weights_step(run / ckpt.EMA_FILE) == 3
    files = ckpt.committed_files(run)
    assert files[ckpt.CONFIG_FILE] == run / ckpt.CONFIG_FILE
    assert all(files[n] == ready / n for n in in_ready)
    proc = _hold_lock_in_another_process(run)    # a trainer owns the run: nobody else may roll forward
    try:
        _assert_one_save(ckpt.read_checkpoint(run, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True), 4)
        assert ckpt.read_trainer_state(run)["step"] == 4
        assert sorted(os.listdir(ready)) == in_ready          # the readers wrote nothing
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()
    assert ckpt.read_trainer_state(run)["step"] == 4          # the lock is free: recovered on the way
    assert not ready.exists()


def test_readers_during_training_never_mix_saves(tmp_path):
    run = tmp_path / "run"
    _save(run, 1)
    done, errors = threading.Event(), []

    def trainer():
        try:
            with ckpt.RunLock(run):
                step, t0 = 2, time.time()
                while time.time() - t0 < 1.5:
                    _save(run, step)
                    step += 1
        except BaseException as e:      # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()
    thread = threading.Thread(target=trainer)
    thread.start()
    seen = []
    while not done.is_set():
        c = ckpt.read_checkpoint(run, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True)
        _assert_one_save(c, c.step)
        seen.append(c.step)
    thread.join()
    assert not errors, errors
    assert len(set(seen)) > 3 and seen == sorted(seen)


# ---------------------------------------------------------------------------------------------
# integrity of weights and trainer state


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_flipped_tensor_bytes_are_detected(tmp_path):
    path = ckpt.write_weights_atomic(tmp_path / "w.safetensors", _weights(1.5), {"note": "hi"})
    state_dict, meta = ckpt.read_weights(path)
    assert meta == {"note": "hi"} and torch.equal(state_dict["b.bias"], _weights(1.5)["b.bias"])
    data = bytearray(path.read_bytes())
    data[_data_offset(path) + 5] ^= 0x01        # one bit of one float: still finite, silently wrong
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"{path} is corrupt: its tensors do not match the hash "
                                                   f"recorded when it was saved; restore it from a copy"):
        ckpt.read_weights(path)
    assert not torch.equal(ckpt.read_weights(path, verify=False)[0]["a.weight"], _weights(1.5)["a.weight"])
    old = tmp_path / "old.safetensors"          # written without a hash (an older run): loads
    plain_save_file(_weights(2.0), str(old), metadata={"step": "5"})
    assert ckpt.read_weights(old)[1] == {"step": "5"}


def test_non_finite_weights_are_refused(tmp_path):
    weights = _weights(1.0)
    weights["b.bias"][2] = math.nan
    path = ckpt.write_weights_atomic(tmp_path / "nan.safetensors", weights)
    with pytest.raises(ckpt.CheckpointError, match=f"{path} holds NaN or inf in b.bias \\(1 of 4 values\\)"):
        ckpt.read_weights(path)
    old = tmp_path / "inf.safetensors"
    plain_save_file({"w": torch.tensor([1.0, math.inf]), "n": torch.tensor([1, 2])}, str(old))
    with pytest.raises(ckpt.CheckpointError, match="holds NaN or inf in w"):
        ckpt.read_weights(old)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "tiny"])
def test_damaged_safetensors_are_named(tmp_path, damage):
    _save(tmp_path, 3)
    path = tmp_path / ckpt.EMA_FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) - 7], "empty": b"", "garbage": os.urandom(300),
                      "tiny": b"\x01\x02"}[damage])
    msg = f"{path} is truncated or not a safetensors file"
    with pytest.raises(ckpt.CheckpointError, match=msg):
        ckpt.read_weights(path)
    with pytest.raises(ckpt.CheckpointError, match=msg):
        ckpt.read_checkpoint(tmp_path)
    if damage != "truncated":                   # the header of a cut-short file is still whole
        with pytest.raises(ckpt.CheckpointError, match=msg):
            ckpt.read_trainer_state(tmp_path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated", "empty", "code", "no_step"])
def test_damaged_or_foreign_trainer_state_is_refused(tmp_path, damage):
    _save(tmp_path, 3)
    path, marker = tmp_path / ckpt.STATE_FILE, tmp_path / "executed"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"step": 3, "x": _RunsCode(marker)} if damage == "code" else [1, 2], path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.read_trainer_state(tmp_path)
    msg = str(info.value)
    assert f"{path} cannot be loaded: it is damaged or was not written by diffusekit" in msg
    # torch's advice to retry with weights_only=False never reaches the user; ours says never
    assert msg.count("weights_only=False") == 1 and "never load it with weights_only=False" in msg
    assert "Re-running" not in msg and "likely succeed" not in msg and info.value.__cause__ is None
    if damage == "code":
        assert "it asks to import posix.system" in msg or "it asks to import os.system" in msg
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# OS errors during writes


def test_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for write in (lambda p: _save(p, 1), lambda p: ckpt.write_text_atomic(p / "a.json", "{}"),
                  lambda p: ckpt.write_weights_atomic(p / "w.safetensors", _weights(1.0))):
        with pytest.raises(ckpt.CheckpointWriteError, match="part of the path is a file, not a folder") as info:
            write(tmp_path / "file" / "run")
        assert isinstance(info.value, ckpt.CheckpointError) and isinstance(info.value, OSError)
        assert str(tmp_path / "file") in str(info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_keeps_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 1)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="make the folder writable"):
            _save(tmp_path, 2)
    finally:
        tmp_path.chmod(0o700)
    assert ckpt.read_trainer_state(tmp_path)["step"] == 1


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = ckpt.files.write_bytes

    def full_at_state(path, data):
        if path.name == ckpt.STATE_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)
    monkeypatch.setattr(ckpt.files, "write_bytes", full_at_state)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not save step 2 .*No space left on device; the "
                                                        r"previous checkpoint there is intact; free disk space"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert not (tmp_path / ckpt.TMP_DIR).exists()
    _assert_one_save(ckpt.read_checkpoint(tmp_path, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True), 1)


FILL_UP = """
import errno, json, resource, signal, sys, torch
from diffusekit import store as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
w = {"a": torch.ones(64, 64)}                       # 16 KiB: over the limit
try:
    ckpt.save_checkpoint(sys.argv[1], 2, ema=w, raw=w, trainer_state={})
except ckpt.CheckpointWriteError as e:
    print(json.dumps({"errno": e.errno, "message": str(e)}))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_file_size_limit_during_a_real_save(tmp_path):
    _save(tmp_path, 1)
    out = subprocess.run([sys.executable, "-c", FILL_UP, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout, out.stderr
    result = json.loads(out.stdout)
    assert result["errno"] == errno.EFBIG and "File too large" in result["message"]
    assert "the previous checkpoint there is intact" in result["message"]
    assert not (tmp_path / ckpt.TMP_DIR).exists()
    _assert_one_save(ckpt.read_checkpoint(tmp_path, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True), 1)


def test_failed_move_after_the_commit_rolls_forward_later(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_replace = os.replace

    def fail_moves(src, dst):
        if os.path.basename(src) != ckpt.TMP_DIR:      # the commit rename works, the moves do not
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", fail_moves)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"the save of step 2 is complete in .*ckpt.ready"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    _assert_one_save(ckpt.read_checkpoint(tmp_path, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True), 2)
    assert ckpt.recover(tmp_path) == "rolled_forward"
    _assert_one_save(ckpt.read_checkpoint(tmp_path, (ckpt.EMA_FILE, ckpt.RAW_FILE), trainer_state=True), 2)


def test_pictures_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    # a write that fails half-way (a kill, a full disk) leaves the previous picture and no temporary file
    import matplotlib.figure
    from diffusekit.viz import figure, save_figure, save_grid
    grid, plot = tmp_path / "grid.png", tmp_path / "loss.png"
    save_grid(torch.zeros(4, 1, 8, 8), grid)
    fig = figure(2, 2)
    fig.add_subplot().plot([0, 1])
    save_figure(fig, plot)
    before = grid.read_bytes(), plot.read_bytes()

    def half_write(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_write)
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, plot)
    import PIL.Image

    def half_image(self, fp, *args, **kw):
        Path(fp).write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(PIL.Image.Image, "save", half_image)
    with pytest.raises(OSError, match="No space left"):
        save_grid(torch.ones(4, 1, 8, 8), grid)
    assert (grid.read_bytes(), plot.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "loss.png"]
