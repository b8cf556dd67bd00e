"""`python -m diffusekit.train --config run.json --out DIR [--resume [STEP|PATH]]`: the entry point torchrun and
accelerate launch start in every process (the library function is diffusekit.training.train). Under
`accelerate launch --mixed_precision X` the run trains in X where its config says precision "auto"
(training.processes.launcher_precision)."""
from __future__ import annotations

import argparse
import dataclasses

from diffusekit.device import rank_world
from diffusekit.store.run_config import read_config_file
from diffusekit.training import train
from diffusekit.training.processes import launcher_precision


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusekit.train --config run.json --out DIR [--resume]` (the torchrun entry point)."""
    p = argparse.ArgumentParser(prog="python -m diffusekit.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="a RunConfig JSON file (e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STEP|PATH",
                   help="continue the run in --out: --resume (the latest save), --resume STEP (its "
                        "checkpoint-STEP folder) or --resume PATH (a checkpoint folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = read_config_file(args.config)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=launcher_precision(cfg.train.precision)))
    r = train(cfg, args.out, resume=args.resume is not None, progress=not args.no_progress, resume_from=args.resume)
    if rank_world()[0] == 0:
        print(f"trained to step {r.step} in {r.seconds:.1f} s; loss {r.loss}; run in {r.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
