"""The `diffusekit` command: a thin layer over the library (no math, no training loop, no policy here).

Each command parses its options, calls one library function and prints what it did. Choices come from
the configs' Literal types and the sampler registry; every error a user can cause prints as one line
with the fix (options.friendly_errors).

  app.py           the command group (`diffusekit [-v|-q] [--threads N] ...`), the stderr log handler
  options.py       shared options (--seed, --dry-run, --device, --precision, sampler knobs), errors
  conditioning.py  --class, --prompt, --guidance, --guide, --classifier
  train.py         train, train-autoencoder, train-classifier
  sample.py        sample, edit, inpaint, invert
  tools.py         eval, tune-steps, export, make-shapes, plot-schedule, plot-process, demo
  finetune.py      finetune, merge
"""
from . import finetune, sample, tools, train  # noqa: F401  (each module attaches its commands to main)
from .app import main

__all__ = ["main"]
