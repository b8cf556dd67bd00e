"""Where a run's numbers go: metrics.jsonl always, TensorBoard on request.

`Tracker.log(step, record)` appends to metrics.jsonl (the run's own record, read by viz.plot_loss
and the model card) and mirrors scalars to TensorBoard (`report_to="tensorboard"`, optional extra
`pip install diffusekit[tensorboard]`); `Tracker.image(step, path)` adds a sample grid.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffusekit.config import ConfigError
from diffusekit.store import write_text_atomic

REPORT_TO = ("none", "tensorboard")


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


class Tracker:
    """metrics.jsonl (resumed: records past the checkpoint dropped) plus an optional TensorBoard writer."""

    def __init__(self, run_dir: Path, start_step: int, report_to: str = "none"):
        if report_to not in REPORT_TO:
            raise ConfigError(f"report_to={report_to!r}; choose one of {list(REPORT_TO)}.")
        self.metrics = MetricsLog(Path(run_dir) / "metrics.jsonl", start_step)
        self.writer = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("report_to='tensorboard' needs the tensorboard package: "
                                  "pip install -e \".[tensorboard]\" (or drop --report-to).") from e
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)

    def log(self, step: int, record: dict) -> None:
        self.metrics.write({"step": step, **record})
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and np.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def image(self, step: int, path: Path) -> None:
        if self.writer is not None:
            from PIL import Image
            pixels = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image("samples", pixels, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
