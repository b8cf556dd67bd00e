"""Where a run's numbers go: metrics.jsonl always, TensorBoard or Weights & Biases on request.

`Tracker.log(step, record)` appends to metrics.jsonl (the run's own record, read by viz.plot_loss
and the model card) and mirrors the finite scalars to the tracker that `report_to` names:
"tensorboard" (RUN/tensorboard; extra `pip install -e ".[tensorboard]"`) or "wandb" (one W&B run
per training session, named after the run folder, with the run's config; extra
`pip install -e ".[wandb]"`). `Tracker.image(step, path)` sends a sample grid to the same tracker.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from diffusekit.config import ConfigError
from diffusekit.store import write_text_atomic

REPORT_TO = ("none", "tensorboard", "wandb")
logger = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl: one JSON record per logging step; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = []
        if start_step > 0 and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _needs(extra: str, package: str):
    return ConfigError(f"report_to={extra!r} needs the {package} package: pip install -e \".[{extra}]\" "
                       f"(or drop --report-to).")


class TensorBoardSink:
    """Scalars and sample grids as TensorBoard events in RUN/tensorboard (a resumed run purges later steps)."""

    def __init__(self, run_dir: Path, start_step: int, config: dict | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _needs("tensorboard", "tensorboard") from e
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, step: int, pixels: np.ndarray) -> None:
        self.writer.add_image("samples", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One Weights & Biases run per training session (a resumed run opens a new one from the resumed step).

    Files go under $WANDB_DIR when set, else RUN/wandb; WANDB_MODE=offline keeps everything local
    (`wandb sync` uploads it later); the project is $WANDB_PROJECT, else "diffusekit"."""

    def __init__(self, run_dir: Path, start_step: int, config: dict | None):
        try:
            import wandb
        except ImportError as e:
            raise _needs("wandb", "wandb") from e
        self.wandb = wandb
        # console="off": wandb must not take over this process's stdout/stderr; silent: its banner is our
        # one log line below. create_new: a run of the caller's own stays untouched (we finish only ours).
        settings = wandb.Settings(console="off", silent=True, reinit="create_new")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "diffusekit", name=run_dir.name,
                              dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                              config=config or {}, settings=settings)
        where = f"offline in {Path(self.run.dir).parent} (upload with `wandb sync`)" if self.run.offline \
            else self.run.url
        logger.info(f"W&B run {self.run.name!r} from step {start_step}: {where}")

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, pixels: np.ndarray) -> None:
        self.run.log({"samples": self.wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class Tracker:
    """metrics.jsonl (resumed: records past the checkpoint dropped) plus the optional tracker of report_to."""

    def __init__(self, run_dir: Path, start_step: int, report_to: str = "none", config: dict | None = None):
        if report_to not in REPORT_TO:
            raise ConfigError(f"report_to={report_to!r}; choose one of {list(REPORT_TO)}.")
        self.metrics = MetricsLog(Path(run_dir) / "metrics.jsonl", start_step)
        self.sink = SINKS[report_to](Path(run_dir), start_step, config) if report_to in SINKS else None

    def log(self, step: int, record: dict) -> None:
        self.metrics.write({"step": step, **record})
        if self.sink is not None:
            self.sink.scalars(step, {k: v for k, v in record.items()
                                     if isinstance(v, (int, float)) and np.isfinite(v)})

    def image(self, step: int, path: Path) -> None:
        if self.sink is not None:
            from PIL import Image
            self.sink.image(step, np.asarray(Image.open(path).convert("RGB")))

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
