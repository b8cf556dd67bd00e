"""`python -m diffusekit.train --config run.json --out DIR [--resume]`: the entry point torchrun and
accelerate launch start in every process (the library function is diffusekit.training.train)."""
from __future__ import annotations

import argparse

from diffusekit.device import rank_world
from diffusekit.store.run_config import read_config_file
from diffusekit.training import train


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusekit.train --config run.json --out DIR [--resume]` (the torchrun entry point)."""
    p = argparse.ArgumentParser(prog="python -m diffusekit.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="a RunConfig JSON file (e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    r = train(read_config_file(args.config), args.out, resume=args.resume, progress=not args.no_progress)
    if rank_world()[0] == 0:
        print(f"trained to step {r.step} in {r.seconds:.1f} s; loss {r.loss}; run in {r.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
