"""Notes go through the `diffusekit` logger: -q silences them (results still printed), -v keeps them,
and a library user silences them with logging alone."""
import json
import logging
import warnings

import pytest
from click.testing import CliRunner

from diffusekit.cli import main

DEPRECATED = ["plot-schedule", "--timesteps", "50", "--dry-run"]      # a note on stderr, JSON on stdout


def test_quiet_silences_notes_and_keeps_results():
    runner = CliRunner()
    loud = runner.invoke(main, DEPRECATED)
    quiet = runner.invoke(main, ["-q", *DEPRECATED])
    verbose = runner.invoke(main, ["-v", *DEPRECATED])
    assert loud.exit_code == quiet.exit_code == verbose.exit_code == 0, loud.output
    assert "deprecated" in loud.stderr and "deprecated" in verbose.stderr
    assert quiet.stderr == ""
    for r in (loud, quiet, verbose):
        assert json.loads(r.stdout)["num_train_timesteps"] == 50           # the result is the same
    assert logging.getLogger("diffusekit").level == logging.DEBUG         # the last call was -v


def test_quiet_silences_warnings_only_while_the_command_runs():
    before = list(warnings.filters)
    r = CliRunner().invoke(main, ["-q", *DEPRECATED])
    assert r.exit_code == 0 and warnings.filters == before


def test_verbose_and_quiet_together_is_a_usage_error():
    r = CliRunner().invoke(main, ["-q", "-v", *DEPRECATED])
    assert r.exit_code == 2 and "contradict" in r.output


def test_notes_are_log_records_a_library_user_can_filter():
    from diffusekit.cli.options import note
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusekit")
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.INFO)
        note("shown")
        logger.setLevel(logging.WARNING)                                  # what a library user writes to silence it
        note("hidden")
    finally:
        logger.removeHandler(handler)
    assert [(r.name, r.levelno, r.getMessage()) for r in records] == [("diffusekit.cli", logging.INFO, "shown")]


@pytest.mark.slow
def test_quiet_hides_the_training_progress_bar(tmp_path):
    """The default draws tqdm's bar on stderr ("train: 100%| ... 3/3"); -q draws none, for this command only."""
    from diffusekit.progress import bars_enabled
    args = ["--data", "digits", "--preset", "tiny8", "--train-steps", "3", "--batch-size", "8", "--sample-every", "0",
            "--device", "cpu"]
    runner = CliRunner()
    loud = runner.invoke(main, ["train", "--out", str(tmp_path / "loud"), *args])
    quiet = runner.invoke(main, ["-q", "train", "--out", str(tmp_path / "quiet"), *args])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "3/3" in loud.stderr and "train" in loud.stderr
    assert "3/3" not in quiet.stderr and "%|" not in quiet.stderr and "it/s" not in quiet.stderr
    assert quiet.stderr == ""
    assert (tmp_path / "quiet" / "model.safetensors").exists()            # it trained all the same
    assert bars_enabled()                                                 # the switch is back on after -q


def test_one_switch_hides_a_library_bar(capsys):
    """dk.progress_bars(False) hides a bar that progress=True asked for (here a sampler's)."""
    import torch
    import diffusekit as dk
    sampler = dk.get_sampler("ddim", dk.NoiseSchedule.create("linear", num_train_timesteps=100))
    eps_model = lambda x, t: torch.zeros_like(x)                          # noqa: E731
    sampler.sample(eps_model, torch.randn(1, 1, 2, 2), num_steps=4, progress=True)
    assert "ddim:" in capsys.readouterr().err                             # the bar (leave=False clears its line)
    with dk.progress_bars(False):
        sampler.sample(eps_model, torch.randn(1, 1, 2, 2), num_steps=4, progress=True)
    assert capsys.readouterr().err == ""
