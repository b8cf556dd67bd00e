"""TEMPORARY (helper B): library functions requested in REQUESTS.md, until they land in their modules."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..schedule import NoiseSchedule
from ..tune import load_steps

TUNED_STEPS_FILE = "tuned_steps.json"


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
