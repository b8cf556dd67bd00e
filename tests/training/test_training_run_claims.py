"""Claims about a run folder that the suite did not protect (issue 23), each pinned to a value.

  - the trainer holds the run's lock for the whole run, not only while it saves: opening the run
    for writing from inside a training step is refused with RunLockedError;
  - checkpoint history is ordered by step, not by folder name: keep=2 after 8, 9, 10, 11 keeps 10, 11;
  - `diffusekit sample RUN` uses RUN/tuned_steps.json: the network is called at exactly its times;
  - the training-time FD (eval_every) is frechet_distance of the EMA model's samples, recomputed here;
  - the model card's and TensorBoard's numbers are metrics.jsonl's.
Each test was checked against its planted bug (see the commit message). Tiny models on 8x8 digits.
"""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from diffusekit import store as ckpt
from diffusekit import metrics as M
from diffusekit.pipeline import Pipeline
from diffusekit.training.resolve import resolve_run_config
from diffusekit.training.diffusion import train

TINY = {"data.source": "digits", "data.image_size": 8, "data.limit": 64, "model.base_channels": 8,
        "model.channel_mult": (1, 2), "model.num_res_blocks": 1, "model.groups": 4, "model.attention_resolutions": (),
        "model.num_heads": 2, "train.batch_size": 16, "train.warmup_steps": 1, "train.sample_every": 0,
        "train.log_every": 1, "train.device": "cpu"}


def run_config(**extra):
    return resolve_run_config({**TINY, **extra})


# --- the run lock ----------------------------------------------------------------------------------

def test_a_second_writer_is_refused_between_saves(tmp_path, monkeypatch):
    import diffusekit.training.diffusion as training
    run_dir, attempts = tmp_path / "r", []
    real_loss = training.diffusion_loss

    def loss_that_tries_to_open_the_run(*args, **kwargs):
        # inside a training step, between saves (save_every=4, steps 1..3 are not saves)
        try:
            lock = ckpt.RunLock(run_dir).acquire()
        except ckpt.RunLockedError as e:
            attempts.append(str(e))
        else:
            lock.release()
            attempts.append("acquired")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", loss_that_tries_to_open_the_run)
    cfg, data = run_config(**{"train.steps": 4, "train.save_every": 4})
    train(cfg, run_dir, dataset=data, progress=False)
    assert len(attempts) == 4
    assert all(re.search(rf"{re.escape(str(run_dir))} is being trained by process \d+ \(this process", a)
               for a in attempts), attempts
    ckpt.RunLock(run_dir).acquire().release()          # released when training ends


# --- checkpoint history ------------------------------------------------------------------------------

def _save(run_dir, step):
    weights = {"w": torch.full((2,), float(step))}
    ckpt.save_checkpoint(run_dir, step, ema=weights, raw=weights, trainer_state={"note": "test"},
                         config_json="{}\n")
    return ckpt.snapshot_checkpoint(run_dir, step, keep=2)


def test_history_is_ordered_by_step_not_by_folder_name(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with ckpt.RunLock(run_dir):
        for step in (8, 9, 10, 11):
            _save(run_dir, step)
    # by name, checkpoint-10 < checkpoint-11 < checkpoint-8 < checkpoint-9: keep=2 would keep 8 and 9
    assert [s for s, _ in ckpt.checkpoint_history(run_dir)] == [10, 11]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-11"]
    for step in (10, 11):
        weights, _ = ckpt.read_weights(run_dir / f"checkpoint-{step}" / ckpt.EMA_FILE)
        assert weights["w"].tolist() == [float(step)] * 2


# --- sample uses the run's tuned steps -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg, data = run_config(**{"train.steps": 2, "train.save_every": 2})
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(cfg, out, dataset=data, progress=False)
    return out


def _record_network_times(monkeypatch) -> list[list[float]]:
    seen, real = [], Pipeline.network

    def network(self):
        call = real(self)

        def recorded(x, t, **cond):
            seen.append(torch.as_tensor(t, dtype=torch.float64).flatten().unique().tolist())
            return call(x, t, **cond)
        return recorded
    monkeypatch.setattr(Pipeline, "network", network)
    return seen


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sample_calls_the_network_at_exactly_the_tuned_times(tiny_run, tmp_path, monkeypatch, sampler):
    from diffusekit.cli import main
    from diffusekit.tune import save_steps
    pipe = Pipeline.load(tiny_run, device="cpu")
    tuned = [917.0, 604.5, 333.0, 41.0]               # uneven: no plain spacing of 4 (or 20) steps gives these
    steps_file = tiny_run / "tuned_steps.json"
    save_steps(steps_file, tuned, {"sampler": sampler, "schedule": pipe.schedule})
    try:
        seen = _record_network_times(monkeypatch)
        r = CliRunner().invoke(main, ["sample", str(tiny_run), "--sampler", sampler, "--n", "2", "--device", "cpu",
                                      "--out", str(tmp_path / "grid.png")])
        assert r.exit_code == 0, r.output
        assert f"using {len(tuned)} tuned model-call times" in r.output
        # one network call per tuned time, each at that time for the whole batch
        assert seen == [[t] for t in tuned]
        seen.clear()
        r = CliRunner().invoke(main, ["sample", str(tiny_run), "--sampler", sampler, "--n", "2", "--steps", "3",
                                      "--device", "cpu", "--out", str(tmp_path / "plain.png")])
        assert r.exit_code == 0 and "tuned" not in r.output       # --steps given: the plain schedule
        assert len(seen) == 3 and [t for (t,) in seen] != tuned[:3]
    finally:
        steps_file.unlink()


# --- training-time evaluation, model card and TensorBoard ------------------------------------------

def test_training_fd_is_frechet_distance_of_the_ema_models_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from diffusekit.training.samples import RunEvaluator, reference_images
    cfg, data = run_config(**{"train.steps": 4, "train.save_every": 4, "train.eval_every": 4,
                              "train.eval_samples": 16, "train.report_to": "tensorboard"})
    run = tmp_path / "r"
    train(cfg, run, dataset=data, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (evaluated,) = [r for r in records if "fd" in r]
    assert evaluated["step"] == 4
    # recompute: the saved EMA weights at step 4 are the ones evaluated; same sampler, steps, seed
    pipe = Pipeline.load(run, device="cpu")
    judge = RunEvaluator(reference_images(data), 16)
    x = pipe.sample(16, judge.sampler, judge.num_steps, generator=torch.Generator().manual_seed(judge.seed))
    fake = M.RawPixelFeatures()(x).double().numpy()
    real = M.RawPixelFeatures()(reference_images(data)).double().numpy()
    expected = M.frechet_distance(*M.feature_stats(fake), *M.feature_stats(real))
    assert evaluated["fd"] == pytest.approx(expected, rel=1e-4)
    kid_mean, _ = M.kid(fake, real, subset_size=16, num_subsets=20, seed=0)
    assert evaluated["kid"] == pytest.approx(kid_mean, rel=1e-3, abs=1e-6)

    # the model card shows the last record's numbers, to its 4 significant digits
    card = (run / "README.md").read_text()
    last = {}
    for r in records:
        last.update({k: v for k, v in r.items() if v is not None})
    for key in ("loss", "fd", "kid"):
        assert f"| last {key} | {last[key]:.4g} |" in card
    assert "trained with diffusekit for 4 of 4 steps" in card

    # TensorBoard holds the same loss values as metrics.jsonl, step by step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    loss_tag = next(t for t in tags if t.split("/")[-1] == "loss")
    logged = {e.step: e.value for e in events.Scalars(loss_tag)}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r}, rel=1e-6)
    fd_tag = next(t for t in tags if t.split("/")[-1] == "fd")
    assert [e.value for e in events.Scalars(fd_tag)] == pytest.approx([evaluated["fd"]], rel=1e-6)
