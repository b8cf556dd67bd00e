"""Steps tuned to the model: explicit timesteps in every sampler, tuning on exact denoisers, steps files."""
import json

import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError
from diffusekit.samplers.base import SAMPLER_SPACINGS
from diffusekit.toy import ExactDenoiserModel, GaussianMixture
from diffusekit.tune import (discrepancy, load_steps, save_steps, schedule_fingerprint, steps_for_nfe,
                             tune_timesteps)

SCHED = dk.NoiseSchedule.create("linear")


@pytest.fixture(scope="module")
def model():
    # the sharp 2-D mixture of bench/samplers.py: 8 components of std 0.1, where few steps hurt most
    mixture = GaussianMixture.random(2, 8, torch.Generator().manual_seed(0), spread=1.0, std=0.1)
    return ExactDenoiserModel(mixture, SCHED)


def _noise(n, seed, d=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- explicit timesteps ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(dk.SAMPLERS))
def test_explicit_timesteps_reproduce_every_spacing(model, name):
    """Given a spacing's own timesteps, every sampler computes exactly what the spacing computes."""
    x = _noise(64, 1)
    for spacing in SAMPLER_SPACINGS:
        sampler = dk.get_sampler(name, SCHED, timestep_spacing=spacing)
        ts, abars = sampler.plan(6)
        ts2, abars2 = sampler.plan(timesteps=ts.tolist())
        torch.testing.assert_close(ts2, ts, rtol=0, atol=0)
        torch.testing.assert_close(abars2, abars, rtol=0, atol=0)
        assert sampler.nfe(timesteps=ts) == sampler.nfe(6)
        torch.testing.assert_close(sampler.timesteps(timesteps=ts), sampler.timesteps(6), rtol=0, atol=0)
        a = sampler.sample(model, x, 6, generator=torch.Generator().manual_seed(5))
        b = sampler.sample(model, x, timesteps=ts, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} {spacing}")
        # early stop and late start follow the same plan
        a = sampler.sample(model, x, 6, start_step=2, stop_step=5, generator=torch.Generator().manual_seed(5))
        b = sampler.sample(model, x, timesteps=ts, start_step=2, stop_step=5, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} {spacing} steps 2..5")


def test_fractional_timesteps_are_called_and_used_as_given(model):
    """The model sees exactly the times given; the solver steps with alpha_bar_at of those times."""
    ts = [999.0, 612.25, 300.5, 41.75, 3.125]
    sampler = dk.get_sampler("dpmpp_2m", SCHED)
    seen, levels = [], []
    sampler.sample(lambda x, t: (seen.append(float(t[0])), model(x, t))[1], _noise(8, 2), timesteps=ts,
                   callback=lambda info: levels.append(info.abar_next))
    assert seen == ts
    expected = SCHED.alpha_bar_at(torch.tensor(ts[1:], dtype=torch.float64)).tolist() + [1.0]
    assert levels == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad,match", [([100.0, 500.0], "descending"), ([1000.0, 10.0], r"\[0, 999\]"),
                                       ([500.0, -1.0], r"\[0, 999\]"), ([500.0, float("nan")], "finite"),
                                       ([], "non-empty"), ([[999.0, 10.0]], "1-D|descending"),
                                       (["a", "b"], "not a list of numbers")])
def test_bad_explicit_timesteps_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        dk.get_sampler("ddim", SCHED).plan(timesteps=bad)


def test_explicit_timesteps_conflicts_are_named():
    with pytest.raises(ConfigError, match="disagrees with the 2 timesteps"):
        dk.get_sampler("ddim", SCHED).sample(lambda x, t: x, _noise(2, 0), num_steps=20, timesteps=[900, 100])
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        dk.get_sampler("euler", SCHED, use_karras_sigmas=True).plan(timesteps=[900, 100])


# --- tuning -----------------------------------------------------------------------------------------

def _best_spacing(model, name, nfe, x, reference):
    """(discrepancy, spacing) of the best built-in spacing within nfe model calls."""
    out = []
    for spacing in SAMPLER_SPACINGS:
        sampler = dk.get_sampler(name, SCHED, timestep_spacing=spacing)
        n = steps_for_nfe(sampler, nfe)
        out.append((discrepancy(model, sampler, x, reference, num_steps=n), spacing))
    return min(out)


@pytest.mark.parametrize("name", ["unipc", "ddim", "heun"])
def test_tuned_steps_beat_every_spacing_on_new_noise(model, name, record_property):
    """Tuned on one noise batch, 5 model calls land closer to the many-step solution from fresh
    noise than the best built-in spacing at 5 calls (logsnr, leading, trailing, linspace)."""
    ts = tune_timesteps(model, SCHED, name, 5, _noise(128, 1), iterations=2)
    sampler = dk.get_sampler(name, SCHED)
    assert sampler.nfe(timesteps=ts) <= 5 and steps_for_nfe(sampler, 5) == len(ts)
    model.nfe = 0
    x = _noise(1000, 2)
    reference = dk.get_sampler("unipc", SCHED, timestep_spacing="logsnr").sample(model, x, 100)
    tuned = discrepancy(model, sampler, x, reference, timesteps=ts)
    best5, spacing5 = _best_spacing(model, name, 5, x, reference)
    assert tuned < best5, f"{name}: tuned {tuned:.3g} >= {spacing5} {best5:.3g} at NFE 5"
    # for the report (not asserted: a 5-call plan against 10 calls is measured in bench/tune_steps.py)
    best10, spacing10 = _best_spacing(model, name, 10, x, reference)
    record_property(f"{name} MSE tuned@5 / best spacing@10 ({spacing10})", tuned / best10)


def test_nfe_is_counted_with_the_sampler():
    """Heun spends 2n - 1 calls and PLMS n + 1, so 5 calls buy 3 and 4 steps."""
    assert steps_for_nfe(dk.get_sampler("heun", SCHED), 5) == 3
    assert steps_for_nfe(dk.get_sampler("plms", SCHED), 5) == 4
    assert steps_for_nfe(dk.get_sampler("unipc", SCHED), 5) == 5
    with pytest.raises(ConfigError, match="nfe=0"):
        tune_timesteps(lambda x, t: x, SCHED, "unipc", 0, _noise(4, 0))


def test_conditioning_and_denoisers_pass_through(model):
    """cond reaches the model in every run, and a Denoiser is used as it is (its prediction type wins)."""
    seen = set()

    def conditional(x, t, scale):
        seen.add(scale)
        return model(x, t)
    x0_model = ExactDenoiserModel(model.mixture, SCHED, "sample")
    ts_cond = tune_timesteps(conditional, SCHED, "unipc", 3, _noise(32, 1), iterations=1, cond={"scale": 7})
    ts_den = tune_timesteps(dk.Denoiser(x0_model, "sample"), SCHED, "unipc", 3, _noise(32, 1), iterations=1)
    assert seen == {7}
    torch.testing.assert_close(ts_den, ts_cond, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,options", [("euler_ancestral", {}), ("ddpm", {}), ("dpmpp_3m_sde", {}),
                                          ("ddim", {"eta": 0.5})])
def test_stochastic_samplers_are_refused(name, options):
    with pytest.raises(ConfigError, match="deterministic samplers only"):
        tune_timesteps(lambda x, t: x, SCHED, name, 5, _noise(4, 0), sampler_options=options)


# --- steps files ------------------------------------------------------------------------------------

def test_steps_file_round_trip(tmp_path):
    ts = torch.tensor([999.0, 512.5, 250.25, 40.125, 2.0], dtype=torch.float64)
    path = save_steps(tmp_path / "steps.json", ts, {"sampler": "heun", "schedule": SCHED, "discrepancy": 0.01})
    back, meta = load_steps(path, sampler="heun", schedule=SCHED)
    torch.testing.assert_close(back, ts, rtol=0, atol=0)
    assert meta["nfe"] == 9 and meta["discrepancy"] == 0.01
    assert meta["schedule"]["fingerprint"] == schedule_fingerprint(SCHED)
    # no temporary file is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.json"]


def test_fingerprint_tells_schedules_apart():
    assert schedule_fingerprint(SCHED) == schedule_fingerprint(dk.NoiseSchedule.create("linear"))
    others = [dk.NoiseSchedule.create("cosine"), dk.NoiseSchedule.create("linear", beta_end=0.012),
              dk.NoiseSchedule.create("linear", num_train_timesteps=500)]
    assert len({schedule_fingerprint(s) for s in [SCHED, *others]}) == 4


def test_bad_steps_files_give_clear_errors(tmp_path):
    good = save_steps(tmp_path / "good.json", [900.0, 300.0, 20.0], {"sampler": "unipc", "schedule": SCHED})
    with pytest.raises(ConfigError, match="tuned for sampler 'unipc', not 'ddim'"):
        load_steps(good, sampler="ddim")
    with pytest.raises(ConfigError, match="another noise schedule .*cosine"):
        load_steps(good, schedule=dk.NoiseSchedule.create("cosine"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_steps(tmp_path / "missing.json")
    record = json.loads(good.read_text())
    cases = {"notjson.json": "{not json", "other.json": json.dumps({"sampler": "unipc"}),
             "edited.json": json.dumps({**record, "nfe": 7}),
             "ascending.json": json.dumps({**record, "timesteps": [20.0, 300.0]}),
             "strings.json": json.dumps({**record, "timesteps": "900,300"}),
             "nofinger.json": json.dumps({**record, "schedule": {"kind": "linear"}})}
    messages = {"notjson.json": "not a readable steps file", "other.json": "not a diffusekit steps file",
                "edited.json": "says nfe=7", "ascending.json": "not a descending list",
                "strings.json": "not a descending list", "nofinger.json": "damaged"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=messages[name]):
            load_steps(tmp_path / name, sampler="unipc", schedule=SCHED)
    with pytest.raises(ConfigError, match="NoiseSchedule"):
        save_steps(tmp_path / "x.json", [900.0], {"sampler": "unipc", "schedule": "linear"})
    with pytest.raises(ConfigError, match="descending"):
        save_steps(tmp_path / "x.json", [100.0, 900.0], {"sampler": "unipc", "schedule": SCHED})
