"""Every mistake a user can make at the command line ends in one short message, exit code 2, no traceback.

A table of bad inputs (issue 13: non-finite options, bad paths, damaged images and run files,
foreign pickles, mistyped or invalid configs, sizes too large to allocate, edited configs, resume
surprises) is walked through `diffusekit` with click's CliRunner; two of them also through a real
`python -m diffusekit` process, to prove that nothing but the message reaches stderr. Each message
must name the file or option at fault. Beside the table: the behaviours resume promises, the refusal
to write non-finite images, and the memory check that refuses before allocating.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffusekit import store as ckpt
from diffusekit.cli import main

MAX_MESSAGE_LINES = 4     # "one line", or a short list of the fields that differ


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_text(result) -> str:
    """The message after click's 'Error: ' (usage errors put two usage lines before it)."""
    out = result.output
    assert "Error: " in out, out
    return out[out.index("Error: ") + len("Error: "):].strip()


def assert_user_error(result, *names):
    """Exit code 2, no exception other than the exit, a short message that names each of `names`."""
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = error_text(result)
    assert len(message.splitlines()) <= MAX_MESSAGE_LINES, message
    for name in names:
        assert str(name).lower() in message.lower(), f"{name!r} not named in: {message}"
    return message


# ---------------------------------------------------------------------------------------------
# one tiny run for the module (a 2-level, 8-channel UNet on 8x8 digits, 2 steps)


def write_tiny_config(folder: Path) -> Path:
    """folder/tiny.json: a run config for a 2-step run of a 2-level, 8-channel UNet on 8x8 digits."""
    r = invoke("train", "--data", "digits", "--out", folder / "unused", "--dry-run")
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    cfg["model"].update(base_channels=8, groups=4, channel_mult=[1, 2], attention_resolutions=[], num_heads=1)
    cfg["train"].update(steps=2, batch_size=16, sample_every=0, save_every=2, log_every=1, warmup_steps=1)
    path = folder / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = invoke("train", "--config", tiny_config, "--out", out, "--seed", 5)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 5
    return out


def write_input_files(d: Path) -> dict[str, Path]:
    """Bad and good input files in d: an empty and a truncated 'PNG', a real digit, a file, invalid JSON."""
    from diffusekit.data import DataConfig, load_dataset, save_image
    (d / "zero.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 3)
    save_image(load_dataset(DataConfig("digits")).images[3], d / "good.png")
    (d / "afile").write_text("a file, not a folder")
    (d / "bad.json").write_text('{"model": {"image_size": 8,}')
    (d / "binary.json").write_bytes(bytes(range(128, 256)))
    (d / "empty").mkdir()
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_input_files(tmp_path_factory.mktemp("inputs"))


def damaged_copy(run: Path, dest: Path, damage) -> Path:
    shutil.copytree(run, dest)
    damage(dest)
    return dest


def truncate(name):
    def damage(run):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:len(data) // 2])
    return damage


def overwrite(name, data):
    return lambda run: (run / name).write_bytes(data)


def edit_config(**sections):
    """Replace config.json sections, or set fields inside them: edit_config(model={"prediction_type": ...})."""
    def damage(run):
        cfg = json.loads((run / "config.json").read_text())
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        (run / "config.json").write_text(json.dumps(cfg))
    return damage


class Foreign:
    """A pickle that needs weights_only=False: loading it would run code (it would write a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran"))


def foreign_state(marker):
    return lambda run: torch.save({"step": 2, "optimizer": Foreign(marker)}, run / ckpt.STATE_FILE)


# ---------------------------------------------------------------------------------------------
# the table: (id, damage to a copy of the run or None, the command (R = the run, F = files, T = tmp),
#             what the message must name)

S = ("--n", 2, "--steps", 2)        # the cheapest sampling

CASES = [
    # non-finite numbers
    ("lr-inf", None, lambda R, F, T, C: ["train", "--config", C, "--out", T / "o", "--lr", "inf"], ["lr", "finite"]),
    ("lr-nan", None, lambda R, F, T, C: ["train", "--config", C, "--out", T / "o", "--lr", "nan"], ["lr", "finite"]),
    ("guidance-nan", None, lambda R, F, T, C: ["sample", R, *S, "--class", 1, "--guidance", "nan"], ["guidance", "finite"]),
    ("guidance-inf", None, lambda R, F, T, C: ["sample", R, *S, "--class", 1, "--guidance", "inf"], ["guidance", "finite"]),
    ("guidance-without-class", None, lambda R, F, T, C: ["sample", R, *S, "--guidance", 2], ["--guidance", "--class"]),
    ("class-dropout-nan", None, lambda R, F, T, C: ["train", "--config", C, "--out", T / "o", "--class-dropout", "nan"],
     ["class_dropout", "finite"]),
    ("guide-window-nan", None, lambda R, F, T, C: ["sample", R, *S, "--guide", "brightness=0.8",
                                                   "--guide-window", "nan", "nan", "--out", T / "s.png"], ["t_window"]),
    ("strength-nan", None, lambda R, F, T, C: ["edit", R, "--image", F["good"], "--strength", "nan", "--steps", 2,
                                               "--out", T / "e.png"], ["strength"]),
    ("eta-nan", None, lambda R, F, T, C: ["sample", R, *S, "--sampler", "ddim", "--eta", "nan"], ["eta"]),
    # output paths
    ("out-below-a-file", None, lambda R, F, T, C: ["train", "--config", C, "--out", F["afile"] / "run"],
     ["afile", "not a folder"]),
    ("invert-out-below-a-file", None, lambda R, F, T, C: ["invert", R, "--image", F["good"], "--steps", 2,
                                                          "--out", F["afile"] / "inv"], ["afile", "not a folder"]),
    # damaged or foreign input images, in every command that reads one
    *[(f"{cmd}-{kind}-image", None,
       (lambda cmd, kind: lambda R, F, T, C: [cmd, R, "--image", F[kind], "--steps", 2, "--out", T / f"{cmd}-out"])(cmd, kind),
       [f"{kind}.png", "cannot be read as an image"])
      for cmd in ("edit", "invert") for kind in ("zero", "corrupt")],
    *[(f"inpaint-{kind}-{which}", None,
       (lambda kind, which: lambda R, F, T, C: ["inpaint", R, "--image", F[kind if which == "image" else "good"],
                                               "--mask", F[kind if which == "mask" else "good"], "--steps", 2,
                                               "--out", T / "i.png"])(kind, which),
       [f"{kind}.png", "cannot be read as an image"])
      for kind in ("zero", "corrupt") for which in ("image", "mask")],
    *[(f"plot-schedule-{kind}-image", None,
       (lambda kind: lambda R, F, T, C: ["plot-schedule", "--image", F[kind], "--out", T / "p.png"])(kind),
       [f"{kind}.png", "cannot be read as an image"]) for kind in ("zero", "corrupt")],
    # damaged run files
    ("truncated-weights", truncate(ckpt.EMA_FILE), lambda R, F, T, C: ["sample", R, *S], [ckpt.EMA_FILE, "truncated"]),
    ("garbled-weights", overwrite(ckpt.EMA_FILE, os.urandom(3000)), lambda R, F, T, C: ["sample", R, *S],
     [ckpt.EMA_FILE, "not a safetensors file"]),
    ("empty-weights", overwrite(ckpt.EMA_FILE, b""), lambda R, F, T, C: ["sample", R, *S], [ckpt.EMA_FILE]),
    ("truncated-trainer-state", truncate(ckpt.STATE_FILE),
     lambda R, F, T, C: ["train", "--out", R, "--train-steps", 4, "--resume"], [ckpt.STATE_FILE, "damaged"]),
    # configs of the wrong shape, invalid JSON, edited meaning
    *[(f"config-{section}-{kind}", edit_config(**{section: value}), lambda R, F, T, C: ["sample", R, *S],
       ["config.json", section]) for section, value, kind in
      (("model", [], "list"), ("schedule", "linear", "string"), ("train", 3, "number"), ("data", None, "null"))],
    ("resume-config-train-wrong-type", edit_config(train=[1, 2]),
     lambda R, F, T, C: ["train", "--out", R, "--train-steps", 4, "--resume"], ["config.json", "train"]),
    ("config-invalid-json", None, lambda R, F, T, C: ["train", "--config", F["bad"], "--out", T / "o"],
     ["bad.json", "line 1"]),
    ("config-binary", None, lambda R, F, T, C: ["train", "--config", F["binary"], "--out", T / "o"],
     ["binary.json", "not a text file"]),
    ("edited-prediction-type", edit_config(model={"prediction_type": "v_prediction"}),
     lambda R, F, T, C: ["sample", R, *S], ["prediction_type", "v_prediction", "epsilon"]),
    ("edited-schedule", edit_config(schedule={"kind": "cosine"}), lambda R, F, T, C: ["sample", R, *S],
     ["schedule.kind", "cosine", "linear"]),
    # sizes refused before anything is allocated
    ("image-size-3000", None, lambda R, F, T, C: ["train", "--data", "digits", "--image-size", 3000, "--out", T / "o"],
     ["--image-size"]),
    ("image-size-unsupported", None, lambda R, F, T, C: ["train", "--data", "digits", "--image-size", 1024,
                                                         "--out", T / "o"], ["image_size=1024"]),
    ("prompt-and-prompts-file", None, lambda R, F, T, C: ["sample", R, *S, "--prompt", "a circle", "--prompts-file",
                                                          F["afile"]], ["--prompt", "--prompts-file", "afile"]),
    ("n-100000000", None, lambda R, F, T, C: ["sample", R, "--n", 100_000_000, "--steps", 1], ["--n"]),
    # resume surprises
    ("resume-with-other-data", None, lambda R, F, T, C: ["train", "--out", R, "--data", F["empty"], "--train-steps", 4,
                                                         "--resume"], ["data.source", "digits", "empty"]),
    ("resume-without-config", None, lambda R, F, T, C: ["train", "--out", F["empty"], "--resume"],
     ["empty", "config.json"]),
    ("resume-below-saved-step", None, lambda R, F, T, C: ["train", "--out", R, "--train-steps", 1, "--resume"],
     ["--train-steps 1", "step 2"]),
]


@pytest.mark.parametrize("damage, command, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_code_2(damage, command, names, tiny_run, tiny_config, files, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "run", damage) if damage else tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    assert_user_error(invoke(*command(run, files, tmp_path, tiny_config)), *names)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before    # a refusal writes nothing


def test_the_table_covers_the_issue():
    assert len(CASES) >= 26


def test_a_foreign_pickle_is_refused_and_never_run(tiny_run, tmp_path):
    marker = tmp_path / "the-pickle-ran"
    run = damaged_copy(tiny_run, tmp_path / "run", foreign_state(marker))
    message = assert_user_error(invoke("train", "--out", run, "--train-steps", 4, "--resume"),
                                ckpt.STATE_FILE, "not written by diffusekit")
    assert "never load it with weights_only=False" in message
    assert not marker.exists()


def test_unwritable_out(tiny_config, tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "run"
    elif Path("/sys").is_dir():
        out = Path("/sys/diffusekit-test-run")     # root may write anywhere else; sysfs refuses a new folder
    else:
        pytest.skip("running as root without /sys: no folder here refuses a write")
    assert_user_error(invoke("train", "--config", tiny_config, "--out", out), str(out.parent), "permission")


def test_diverging_lr_names_the_step(tiny_config, tmp_path):
    message = assert_user_error(invoke("train", "--config", tiny_config, "--out", tmp_path / "o", "--lr", 1e30),
                                "diverged", "step", "--lr")
    assert "no checkpoint had been saved yet" in message


def test_overwrite_refuses_a_run_being_trained(tiny_run, tiny_config, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "run", lambda run: None)
    with ckpt.RunLock(run):                  # what a trainer holds while it trains
        assert_user_error(invoke("train", "--config", tiny_config, "--out", run, "--overwrite"),
                          str(run), "being trained by")
    assert (run / ckpt.EMA_FILE).exists()


# ---------------------------------------------------------------------------------------------
# resume: settings come from the run; a finished run says so; a refused resume changes nothing


def test_resume_keeps_the_runs_seed(tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "run", lambda run: None)
    r = invoke("train", "--out", run, "--train-steps", 3, "--resume")       # no --seed
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["seed"] == 5 and cfg["train"]["steps"] == 3
    assert ckpt.read_trainer_state(run)["step"] == 3


def test_resuming_a_finished_run_says_so(tiny_run):
    r = invoke("train", "--out", tiny_run, "--resume")
    assert r.exit_code == 0, r.output
    assert "already finished its 2 steps" in r.output


def test_refused_resume_leaves_config_json_alone(tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "run", lambda run: None)
    config = (run / "config.json").read_bytes()
    for args in (["--train-steps", 1], ["--data", tmp_path, "--train-steps", 4], ["--lr", 1.0, "--train-steps", 4]):
        assert invoke("train", "--out", run, *args, "--resume").exit_code == 2
        assert (run / "config.json").read_bytes() == config


# ---------------------------------------------------------------------------------------------
# non-finite images are never written; sizes are checked before allocating


def test_non_finite_images_are_refused_not_written(tiny_run, tmp_path):
    out = tmp_path / "s.png"
    # a finite but absurd guidance scale overflows the CFG mix to inf/NaN
    message = assert_user_error(invoke("sample", tiny_run, *S, "--class", 1, "--guidance", 1e300, "--out", out),
                                "NaN")
    assert "guidance" in message and not out.exists()



def test_non_finite_edits_are_refused_not_written(tiny_run, files, tmp_path):
    edited = tmp_path / "e.png"
    assert_user_error(invoke("edit", tiny_run, "--image", files["good"], "--steps", 2, "--class", 1,
                             "--guidance", 1e300, "--out", edited), "SDEdit", "NaN")
    assert not edited.exists()


def test_memory_is_checked_before_allocating(tiny_run, tmp_path, monkeypatch):
    import diffusekit.memory as memory
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 50 * 2**20)
    out = tmp_path / "s.png"
    message = assert_user_error(invoke("sample", tiny_run, "--n", 100_000, "--batch-size", 100_000, "--steps", 1,
                                       "--out", out), "100000 images", "50.0 MiB free", "--batch-size")
    assert "GiB" in message and not out.exists()
    assert_user_error(invoke("sample", tiny_run, "--n", 100_000, "--batch-size", 100, "--steps", 1, "--out", out),
                      "fewer images (--n 100000")
    monkeypatch.undo()
    r = invoke("sample", tiny_run, "--n", 3, "--steps", 1, "--out", out)         # a normal request still runs
    assert r.exit_code == 0 and out.exists()


# ---------------------------------------------------------------------------------------------
# through a real process: stderr holds the message and nothing else


def _cli(*args, preexec_fn=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "diffusekit", *map(str, args)], capture_output=True, text=True,
                          env=env, preexec_fn=preexec_fn, timeout=240)


def _file_size_limit(limit):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_no_traceback_reaches_stderr(tiny_run, files, tmp_path):
    p = _cli("edit", tiny_run, "--image", files["corrupt"], "--steps", 2, "--out", tmp_path / "e.png")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("Error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "corrupt.png" in p.stderr
    # the disk fills up while the edited image is written: a file-size limit of 100 bytes (EFBIG)
    edited = tmp_path / "edited.png"
    p = _cli("edit", tiny_run, "--image", files["good"], "--steps", 2, "--out", edited,
             preexec_fn=_file_size_limit(100))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    message = p.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: ") and "edited.png" in message and "limit" in message, p.stderr
    assert not edited.exists() and not list(tmp_path.glob("*.tmp"))        # no half-written image left


# ---------------------------------------------------------------------------------------------
# nothing lost (issue 23): --overwrite deletes only what diffusekit wrote; --out apart from --data;
# no export into a run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder: Path) -> dict[str, bytes]:
    (folder / "keep.txt").write_text("my notes")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return {"keep.txt": b"my notes", "sub/data.csv": b"a,b\n1,2\n"}


def test_overwrite_deletes_what_diffusekit_wrote_and_keeps_the_users_files(tiny_run, tiny_config, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "run", lambda run: None)
    from diffusekit.store.manifest import note_written
    mine = _user_files(run)
    (run / "samples").mkdir()               # grids an earlier run wrote (and recorded): they go
    (run / "samples" / "step_1.png").write_bytes(b"png")
    note_written(run, ["samples"])
    r = invoke("train", "--config", tiny_config, "--out", run, "--overwrite", "--seed", 9)
    assert r.exit_code == 0, r.output
    after = _snapshot(run)
    assert {k: after.get(k) for k in mine} == mine                       # the user's files survive, unchanged
    assert not (run / "samples").exists()
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 9     # a fresh run was written
    assert ckpt.read_trainer_state(run)["step"] == 2


def test_overwrite_refuses_a_folder_diffusekit_did_not_write(tiny_config, tmp_path):
    project = tmp_path / "web"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "my-web-app", "port": 8080}')
    (project / "src" / "app.js").write_text("console.log('hi')")
    before = _snapshot(project)
    assert_user_error(invoke("train", "--config", tiny_config, "--out", project, "--overwrite"),
                      str(project), "not a diffusekit run", "nothing in it is deleted")
    assert _snapshot(project) == before


def test_overwrite_deletes_only_the_manifests_entries(tmp_path):
    from diffusekit.store.manifest import MANIFEST_FILE, clear_run, note_written
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"w")
    (run / "samples").mkdir()
    (run / "samples" / "step_1.png").write_bytes(b"p")
    (run / "config.json").write_text("{}")          # not recorded: written by someone else, so it stays
    mine = _user_files(run)
    note_written(run, ["model.safetensors", "samples"])
    assert sorted(clear_run(run)) == sorted([MANIFEST_FILE, "model.safetensors", "samples"])
    after = _snapshot(run)
    after.pop(ckpt.LOCK_FILE, None)             # the run's lock file, which clear_run held while deleting
    assert after == {**mine, "config.json": b"{}"}


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """An 8x8 digits folder with class sub-folders."""
    from diffusekit.data import DataConfig, load_dataset, save_image
    data = tmp_path / "data"
    images = load_dataset(DataConfig("digits", image_size=8)).images
    for k in range(4):
        (data / str(k % 2)).mkdir(parents=True, exist_ok=True)
        save_image(images[k], data / str(k % 2) / f"{k}.png")
    return data


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_overlapping_the_data_is_refused_and_the_data_survives(tiny_config, image_folder, where):
    out = {"same": image_folder, "inside": image_folder / "run", "contains": image_folder.parent}[where]
    before = _snapshot(image_folder)
    for extra in ([], ["--overwrite"]):
        message = assert_user_error(invoke("train", "--config", tiny_config, "--data", image_folder, "--out", out,
                                           *extra), str(image_folder), "--out")
        assert {"same": " is ", "inside": "lies inside", "contains": "contains"}[where] in message
        assert _snapshot(image_folder) == before


def test_export_into_a_run_is_refused_and_the_run_is_unchanged(tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "run", lambda run: None)
    other = damaged_copy(tiny_run, tmp_path / "other", lambda run: None)
    for target, names in ((run, [str(run), "run folder"]), (run / "exported", [str(run), "inside"]),
                          (other, [str(other), "run folder"])):
        before = {p: _snapshot(p) for p in (run, other)}
        assert_user_error(invoke("export", run, target, "--overwrite"), *names)
        assert {p: _snapshot(p) for p in (run, other)} == before
        assert not (run / "model_index.json").exists() and not (run / "exported").exists()


# ---------------------------------------------------------------------------------------------
# options: a command offers what it uses, one word per concept


@pytest.mark.parametrize("command, option", [
    (["make-shapes", "x"], ["--device", "cpu"]), (["make-shapes", "x"], ["--precision", "fp32"]),
    (["export", "r", "x"], ["--seed", "1"]), (["export", "r", "x"], ["--device", "cpu"]),
    (["export", "r", "x"], ["--precision", "fp32"]), (["plot-schedule"], ["--device", "cpu"]),
    (["invert", "r", "--image", "i"], ["--seed", "1"]), (["demo", "r"], ["--seed", "1"])])
def test_an_option_a_command_does_not_use_is_not_offered(command, option):
    r = invoke(*command, *option)
    assert r.exit_code == 2 and "No such option" in r.output and option[0] in r.output, r.output


def test_every_command_has_a_worked_example_and_seed_where_it_draws_random_numbers():
    random = {"train", "train-autoencoder", "train-classifier", "sample", "edit", "inpaint", "eval", "tune-steps",
              "make-shapes", "plot-schedule", "plot-process", "finetune"}
    for name, command in main.commands.items():
        r = invoke(name, "--help")
        assert r.exit_code == 0 and "Example" in r.output and f"diffusekit {name}" in r.output, name
        assert ("--seed" in r.output) == (name in random), name
        assert "--dry-run" in r.output, name


def test_text_encoder_is_one_option_and_the_old_spelling_still_works(tmp_path):
    from diffusekit.cli.train import text_encoder
    assert text_encoder("learned", None) == {"text.kind": "learned"}
    assert text_encoder("pretrained", None) == {"text.kind": "pretrained"}
    assert text_encoder("minilm", None) == {"text.kind": "pretrained", "text.path": "minilm"}
    assert text_encoder("pretrained", "some/folder") == {"text.kind": "pretrained", "text.path": "some/folder"}
    assert text_encoder(None, "some/folder") == text_encoder("some/folder", None)
    r = invoke("train", "--data", "shapes", "--text", "learned", "--out", tmp_path / "o", "--dry-run")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"]["kind"] == "learned"
    assert_user_error(invoke("train", "--data", "shapes", "--text", "learned", "--text-encoder", "minilm",
                             "--out", tmp_path / "o", "--dry-run"), "--text learned", "--text-encoder minilm")


def test_plot_schedule_names_training_timesteps_as_the_config_does():
    r = invoke("plot-schedule", "--num-train-timesteps", 60, "--dry-run")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_train_timesteps"] == 60
    r = invoke("plot-schedule", "--timesteps", 50, "--dry-run")        # the old spelling still works, with a note
    assert r.exit_code == 0 and json.loads(r.stdout)["num_train_timesteps"] == 50
    assert "--num-train-timesteps" in r.stderr


def test_a_trained_run_records_what_it_wrote(tiny_run):
    from diffusekit.store.manifest import written
    names = written(tiny_run)
    assert names is not None and {ckpt.CONFIG_FILE, ckpt.EMA_FILE, ckpt.STATE_FILE, "metrics.jsonl"} <= names
    assert all(not n.startswith("keep") for n in names)


@pytest.mark.parametrize("command", ["train-classifier", "train-autoencoder"])
def test_other_trainers_refuse_an_out_inside_their_data(command, image_folder):
    before = _snapshot(image_folder)
    assert_user_error(invoke(command, "--data", image_folder, "--out", image_folder / "run", "--train-steps", 1,
                             "--device", "cpu"), str(image_folder), "lies inside")
    assert _snapshot(image_folder) == before and not (image_folder / "run").exists()


def test_guidance_and_class_checks_name_the_models_kind():
    """Pipeline.check_guidance / class_labels: one library check each, the message names what the model takes."""
    from diffusekit import NoiseSchedule, Pipeline
    from diffusekit.config import ConfigError

    class TextModel(torch.nn.Module):            # stands for a text-conditioned network: only its interface matters
        def encode_text(self, prompts):
            return {}

    sched = NoiseSchedule.create("linear", 10)
    text = Pipeline(TextModel(), sched, image_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"text-conditioned \(no classes\).*--prompt"):
        text.class_labels(3, 2)
    text.check_guidance(2.0)                        # text guidance needs no class
    classes = Pipeline(torch.nn.Identity(), sched, image_shape=(1, 8, 8), num_classes=3)
    with pytest.raises(ConfigError, match="--guidance.*--class"):
        classes.check_guidance(2.0)
    classes.check_guidance(2.0, torch.tensor([0, 1]))
    classes.check_guidance(1.0)
    plain = Pipeline(torch.nn.Identity(), sched, image_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="needs a class- or text-conditional model"):
        plain.check_guidance(2.0, labels_known=False)
