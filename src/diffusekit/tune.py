"""Timesteps tuned to the model: place a few-step sampler's model calls where they cost least error.

In the spirit of "Align Your Steps" (Sabour et al. 2024), but by direct discrepancy minimisation:
from the same starting noise, a deterministic sampler run with n model-call times should land where
a many-step solution of the same probability-flow ODE lands. The times are tuned one at a time by
golden-section search in log-SNR between their neighbours and by trial moves into every other gap
(coordinate descent), starting from the best of the built-in spacings ("logsnr" first). The result
is a descending list of fractional timesteps for Sampler.sample(..., timesteps=...), saved and
loaded as JSON with save_steps / load_steps; plan_steps decides which steps sampling a run uses.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError
from .progress import bar as progress_bar
from .samplers.base import SAMPLER_SPACINGS, SAMPLERS, Denoiser, Sampler, get_sampler, logsnr_timesteps
from .schedule import NoiseSchedule

STEPS_FORMAT = "diffusekit.steps"
STEPS_VERSION = 1
TUNED_STEPS_FILE = "tuned_steps.json"     # RUN/tuned_steps.json: what sampling a run uses by default
GOLDEN_EVALUATIONS = 12   # sampler runs per time and sweep: the bracket shrinks to 0.618^11 ~ 0.5 % of its width


def schedule_fingerprint(schedule: NoiseSchedule) -> str:
    """A short hash of the schedule's alphas_cumprod, printed to 10 significant digits (so that
    last-bit differences between machines or torch versions do not change it)."""
    text = ",".join(f"{v:.9e}" for v in schedule.alphas_cumprod.tolist())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deterministic_sampler(sampler_name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                          options: dict | None = None) -> Sampler:
    """The registered sampler, refused with a clear error when it draws noise (tuning needs the same
    noise to give the same output)."""
    sampler = get_sampler(sampler_name, schedule, prediction_type=prediction_type, **(options or {}))
    if sampler.spec.stochastic or float(sampler.options.get("eta", 0.0)) > 0:
        ok = sorted(n for n, s in SAMPLERS.items() if not s.stochastic)
        raise ConfigError(f"sampler {sampler_name!r} with options {sampler.options} is stochastic; steps can be tuned "
                          f"for deterministic samplers only: {ok} (ddim with eta=0).")
    if sampler.options.get("use_karras_sigmas"):
        raise ConfigError("use_karras_sigmas=True places the noise levels itself; tune without it.")
    return sampler


def steps_for_nfe(sampler: Sampler, nfe: int) -> int:
    """The most steps whose model calls, counted by Sampler.nfe, fit in nfe (Heun: 2n - 1, PLMS: n + 1)."""
    if not isinstance(nfe, int) or isinstance(nfe, bool) or not 1 <= nfe <= sampler.schedule.num_train_timesteps:
        raise ConfigError(f"nfe={nfe!r}; give the number of model calls as an integer from 1 to "
                          f"{sampler.schedule.num_train_timesteps}, such as 5.")
    n = nfe
    while n > 1 and sampler.nfe(timesteps=logsnr_timesteps(sampler.schedule, n, sampler.spec.style)) > nfe:
        n -= 1
    return n


def _log_snr(schedule: NoiseSchedule, t: float) -> float:
    # lambda = log(abar / (1 - abar)), at the noise level the sampler uses for time t
    abar = float(schedule.alpha_bar_at(torch.tensor([t], dtype=torch.float64)))
    # a zero-terminal-SNR schedule has abar = 0 at t = T - 1: a finite search bound instead of -inf
    abar = min(max(abar, 1e-12), 1 - 1e-12)
    return math.log(abar) - math.log1p(-abar)


def _t_of_log_snr(schedule: NoiseSchedule, lam: float) -> float:
    """The time whose noise level under alpha_bar_at is lambda: the inverse of t_to_sigma, which
    interpolates sigma linearly between integer timesteps."""
    sigma, s = math.exp(-0.5 * lam), schedule.sigmas
    idx = int(torch.searchsorted(s, torch.tensor([sigma], dtype=torch.float64), right=True)) - 1
    idx = min(max(idx, 0), len(s) - 2)
    w = min(max((sigma - float(s[idx])) / float(s[idx + 1] - s[idx]), 0.0), 1.0)
    return idx + w


def _golden_section(f: Callable[[float], float], a: float, b: float, evaluations: int) -> list[tuple[float, float]]:
    """Golden-section search for a minimum of f inside (a, b); returns every (x, f(x)) evaluated."""
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    seen = [(c, fc), (d, fd)]
    for _ in range(evaluations - 2):
        # keep the sub-bracket that holds the smaller value; one new point per iteration
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
            seen.append((c, fc))
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
            seen.append((d, fd))
    return seen


def _relocations(schedule: NoiseSchedule, ts: torch.Tensor, i: int) -> list[torch.Tensor]:
    """Plans with time i taken out and put back in the middle (in log-SNR) of each other gap, the
    gaps to t = T - 1 and t = 0 included: the moves that golden section between neighbours cannot make."""
    rest = torch.cat([ts[:i], ts[i + 1:]])
    ends = torch.cat([torch.tensor([schedule.num_train_timesteps - 1.0], dtype=torch.float64), rest,
                      torch.zeros(1, dtype=torch.float64)])
    plans = []
    for j in range(len(ends) - 1):
        if j == i or float(ends[j]) <= float(ends[j + 1]):
            continue   # j == i is the gap it came from; equal ends (a time at T - 1 or 0) leave no room
        middle = _t_of_log_snr(schedule, 0.5 * (_log_snr(schedule, float(ends[j])) + _log_snr(schedule, float(ends[j + 1]))))
        plans.append(torch.cat([rest[:j], torch.tensor([middle], dtype=torch.float64), rest[j:]]))
    return plans


def _best_move(loss: Callable[[torch.Tensor], float], schedule: NoiseSchedule, ts: torch.Tensor,
               i: int) -> tuple[torch.Tensor, float]:
    """The best plan found by moving time i: golden section in log-SNR between its neighbours (the
    domain's ends t = T - 1 and t = 0 tried as well), then relocation into every other gap."""
    T = schedule.num_train_timesteps

    def moved(t: float) -> torch.Tensor:
        trial = ts.clone()
        trial[i] = t
        return trial
    # neighbours bound the search, so the times stay strictly descending
    hi_t = float(ts[i - 1]) if i > 0 else T - 1.0
    lo_t = float(ts[i + 1]) if i < len(ts) - 1 else 0.0
    tried = [(moved(_t_of_log_snr(schedule, lam)), v) for lam, v in _golden_section(
        lambda lam: loss(moved(_t_of_log_snr(schedule, lam))), _log_snr(schedule, hi_t), _log_snr(schedule, lo_t),
        GOLDEN_EVALUATIONS)]
    tried += [(moved(t), loss(moved(t))) for t, end in ((T - 1.0, i == 0), (0.0, i == len(ts) - 1)) if end]
    tried += [(plan, loss(plan)) for plan in _relocations(schedule, ts, i)]
    return min(tried, key=lambda pv: pv[1])


def _coordinate_descent(loss: Callable[[torch.Tensor], float], schedule: NoiseSchedule, ts: torch.Tensor,
                        sweeps: int, bar=None) -> tuple[torch.Tensor, float]:
    """Move each time in turn to its best place (see _best_move); never accepts a worse plan."""
    ts, best = ts.clone(), loss(ts)
    for _ in range(sweeps):
        start = best
        for i in range(len(ts)):
            plan, value = _best_move(loss, schedule, ts, i)
            if value < best:
                ts, best = plan, value
            if bar is not None:
                bar.update(1)
        if not best < start:
            break
    return ts, best


def tune_timesteps(denoiser_or_model, schedule: NoiseSchedule, sampler_name: str, nfe: int, x_T, *,
                   prediction_type: str = "epsilon", reference_steps: int = 100, iterations: int = 3,
                   generator: torch.Generator | None = None, cond: dict | None = None, progress: bool = False,
                   sampler_options: dict | None = None, reference_sampler: str = "unipc") -> torch.Tensor:
    """Model-call times (n,), descending, fractional, for a deterministic sampler within nfe calls.

    Minimises the mean squared difference between the sampler's output with those times and a
    reference_steps-step solution from the same noise x_T (a tensor, or a shape drawn from generator).
    All deterministic samplers solve the same probability-flow ODE, so the reference comes from the
    most accurate one here (UniPC on the log-SNR grid) whatever sampler is tuned. iterations: sweeps
    of coordinate descent (each costs about n * (13 + n) sampler runs); cond: conditioning passed to the model.
    """
    sampler = deterministic_sampler(sampler_name, schedule, prediction_type, sampler_options)
    n = steps_for_nfe(sampler, nfe)
    if not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"iterations={iterations!r}; give the number of coordinate-descent sweeps, 0 or more.")
    if not isinstance(x_T, torch.Tensor):
        source = generator.device if generator is not None else "cpu"
        x_T = torch.randn(tuple(x_T), generator=generator, device=source)
    denoiser = denoiser_or_model if isinstance(denoiser_or_model, Denoiser) else \
        Denoiser(denoiser_or_model, prediction_type)
    cond = cond or {}
    with torch.no_grad():
        reference = get_sampler(reference_sampler, schedule, prediction_type=prediction_type,
                                timestep_spacing="logsnr").sample(denoiser, x_T, reference_steps, generator, **cond)

        def loss(ts: torch.Tensor) -> float:
            if not bool((ts[1:] < ts[:-1]).all()):
                return math.inf
            x = sampler.sample(denoiser, x_T, timesteps=ts, generator=generator, **cond)
            value = float(((x.double() - reference.double()) ** 2).mean())
            return value if math.isfinite(value) else math.inf

        # start from the best built-in spacing; "logsnr" first, so that it wins ties
        starts = [get_sampler(sampler_name, schedule, timestep_spacing=s, **sampler.options).plan(n)[0]
                  for s in ("logsnr",) + tuple(s for s in SAMPLER_SPACINGS if s != "logsnr")
                  if not (s == "leading" and sampler.spec.style == "solver" and n >= schedule.num_train_timesteps)]
        ts = min(starts, key=loss)
        if iterations == 0:
            return ts
        with progress_bar(total=iterations * n, desc=f"tuning {sampler_name} steps", show=progress, leave=False) as bar:
            ts, _ = _coordinate_descent(loss, schedule, ts, iterations, bar)
    return ts


def discrepancy(denoiser_or_model, sampler: Sampler, x_T: torch.Tensor, reference: torch.Tensor, *,
                num_steps: int | None = None, timesteps=None, **cond) -> float:
    """Mean squared difference between sampler's output from x_T and a reference from the same noise."""
    with torch.no_grad():
        x = sampler.sample(denoiser_or_model, x_T, num_steps, timesteps=timesteps, **cond)
    return float(((x.double() - reference.double()) ** 2).mean())


# --- steps files ----------------------------------------------------------------------------------

def save_steps(path: str | Path, timesteps, meta: dict) -> Path:
    """Write tuned timesteps as JSON, atomically: format, sampler, options, nfe, timesteps, schedule, extras.

    meta needs "sampler" (a registry name) and "schedule" (the NoiseSchedule tuned on); "options"
    (the sampler's options) is optional; the NFE is counted with the registry; any other
    JSON-serialisable keys (prediction_type, discrepancy, run, ...) are kept as they are.
    """
    meta = dict(meta)
    missing = [k for k in ("sampler", "schedule") if k not in meta]
    if missing:
        raise ConfigError(f"save_steps needs meta keys {missing} (the sampler name and the NoiseSchedule tuned on).")
    schedule, name, options = meta.pop("schedule"), meta.pop("sampler"), dict(meta.pop("options", {}) or {})
    if not isinstance(schedule, NoiseSchedule):
        raise ConfigError(f"meta['schedule'] is a {type(schedule).__name__}; pass the NoiseSchedule itself "
                          "(its fingerprint is stored).")
    sampler = get_sampler(name, schedule, **options)
    ts, _ = sampler.plan(timesteps=timesteps)   # checks the times
    record = {"format": STEPS_FORMAT, "version": STEPS_VERSION, "sampler": name, "options": options,
              "nfe": sampler.nfe(timesteps=ts), "timesteps": ts.tolist(),
              "schedule": {"fingerprint": schedule_fingerprint(schedule), "kind": schedule.config.kind,
                           "num_train_timesteps": schedule.num_train_timesteps}, **meta}
    from .store import write_text_atomic
    # write then rename: a crash never leaves a half-written steps file behind
    return write_text_atomic(path, json.dumps(record, indent=1) + "\n")


def load_steps(path: str | Path, sampler: str | None = None,
               schedule: NoiseSchedule | None = None) -> tuple[torch.Tensor, dict]:
    """(timesteps, meta) from a steps file; raises ConfigError, saying why and what to do, when the
    file is missing or damaged, or was tuned for another sampler than `sampler` or another schedule
    than `schedule` (each checked when given)."""
    path = Path(path)
    retune = f"make a new one with diffusekit.tune.tune_timesteps (the CLI: diffusekit tune-steps RUN --out {path})"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"steps file {path} does not exist; {retune}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable steps file ({err}); {retune}.") from None
    if not isinstance(record, dict) or record.get("format") != STEPS_FORMAT:
        raise ConfigError(f"{path} is not a diffusekit steps file (no \"format\": {STEPS_FORMAT!r}); {retune}.")
    missing = [k for k in ("sampler", "nfe", "timesteps", "schedule") if k not in record]
    fingerprint = record.get("schedule", {}).get("fingerprint") if isinstance(record.get("schedule"), dict) else None
    if missing or fingerprint is None:
        raise ConfigError(f"{path} lacks {missing or ['schedule.fingerprint']}; the file is damaged; {retune}.")
    if sampler is not None and sampler != record["sampler"]:
        raise ConfigError(f"{path} was tuned for sampler {record['sampler']!r}, not {sampler!r}; sample with "
                          f"sampler {record['sampler']!r}, or tune steps for {sampler!r}.")
    if schedule is not None and schedule_fingerprint(schedule) != fingerprint:
        made = record["schedule"]
        raise ConfigError(f"{path} was tuned on another noise schedule ({made.get('kind')}, "
                          f"T={made.get('num_train_timesteps')}, fingerprint {fingerprint}) than this model's "
                          f"({schedule.config.kind}, T={schedule.num_train_timesteps}, fingerprint "
                          f"{schedule_fingerprint(schedule)}); tune steps for this model.")
    ts = torch.as_tensor(record["timesteps"], dtype=torch.float64) if _numbers(record["timesteps"]) else None
    if ts is None or ts.ndim != 1 or len(ts) == 0 or not bool((ts[1:] < ts[:-1]).all()) or float(ts.min()) < 0:
        raise ConfigError(f"{path}: timesteps {record['timesteps']!r} are not a descending list of times >= 0; "
                          f"the file is damaged; {retune}.")
    if schedule is not None:
        check = get_sampler(record["sampler"], schedule, **(record.get("options") or {}))
        ts, _ = check.plan(timesteps=ts)
        if check.nfe(timesteps=ts) != record["nfe"]:
            raise ConfigError(f"{path} says nfe={record['nfe']} but its {len(ts)} timesteps cost "
                              f"{check.nfe(timesteps=ts)} calls with {record['sampler']!r}; the file was edited; {retune}.")
    return ts, record


def _numbers(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


@dataclass
class StepPlan:
    """The steps a run samples with: a plain count, or tuned model-call times (and why, for the user)."""
    num_steps: int
    timesteps: torch.Tensor | None = None
    note: str | None = None            # one line on which steps file is used, or why the run's is not


def plan_steps(run_dir: str | Path, schedule: NoiseSchedule, sampler: str, steps: int | None = None,
               timesteps_file: str | Path | None = None, guidance_scale: float = 1.0,
               default_steps: int = 20) -> StepPlan:
    """The steps for sampling a run: a steps file given (checked against sampler and schedule), else
    RUN/tuned_steps.json when it was tuned for this sampler at this guidance scale and `steps` is not
    given, else `steps` (default_steps when None)."""
    path = Path(timesteps_file) if timesteps_file else Path(run_dir) / TUNED_STEPS_FILE
    plain = StepPlan(steps or default_steps)
    if timesteps_file is None and (steps is not None or not path.exists()):
        return plain
    if timesteps_file is None:
        record = json.loads(path.read_text())
        if record.get("sampler") != sampler:
            return plain
        tuned_at = float(record.get("guidance_scale", 1.0))
        if tuned_at != guidance_scale:
            return replace(plain, note=f"not using {path}: tuned at guidance {record.get('guidance_scale', 1.0)}, "
                                       f"sampling at {guidance_scale} (diffusekit tune-steps {run_dir} --guidance "
                                       f"{guidance_scale} tunes for it)")
    ts, record = load_steps(path, sampler=sampler, schedule=schedule)
    tuned_at = float(record.get("guidance_scale", 1.0))
    other = "" if tuned_at == guidance_scale else f", tuned at guidance {tuned_at}, not {guidance_scale}"
    return StepPlan(len(ts), ts, f"using {len(ts)} tuned model-call times from {path} ({record['nfe']} "
                                 f"evaluations{other})")


def tune_pipeline_steps(pipe, sampler: str, nfe: int, out: str | Path | None = None, *, n: int = 16,
                        reference_steps: int = 100, iterations: int = 3, guidance_scale: float = 1.0,
                        generator: torch.Generator | None = None, progress: bool = False) -> tuple[torch.Tensor, Path]:
    """Tune nfe model-call times for sampling a Pipeline with `sampler` at `guidance_scale`, and save them.

    The discrepancy is measured on n noise images (balanced classes k mod K for a class-conditional
    model), with the guided denoiser the pipeline samples with (the guided ODE differs from the plain
    one). Writes `out` (default RUN/tuned_steps.json, which plan_steps then picks up for that sampler
    and guidance scale). Returns (timesteps, the file written).
    """
    cond = pipe.conditioning(torch.arange(n) % pipe.num_classes if pipe.num_classes else None, n)
    x_T = torch.randn((n, *pipe.latent_shape), generator=generator).to(pipe.device)
    with torch.no_grad():
        ts = tune_timesteps(pipe.denoiser(guidance_scale), pipe.schedule, sampler, nfe, x_T,
                            prediction_type=pipe.prediction_type, reference_steps=reference_steps,
                            iterations=iterations, cond=cond, progress=progress)
    path = Path(out) if out is not None else Path(pipe.source) / TUNED_STEPS_FILE
    save_steps(path, ts, {"sampler": sampler, "schedule": pipe.schedule, "prediction_type": pipe.prediction_type,
                          "guidance_scale": guidance_scale, "run": str(pipe.source)})
    return ts, path
