"""What diffusekit wrote in a run folder, so that starting a run afresh deletes that and nothing else.

A run folder can hold a user's own files beside the run (notes, a sub-folder, a copy of the data).
`--overwrite` must not lose them (issue 23: it used to delete the whole folder whenever it held a
`config.json`, which took a web project's `src/` and a run's `keep.txt` with it). So:

- the trainer records the top-level entries it writes in RUN/.diffusekit-manifest.json
  (`note_written`, a union written atomically, so a crash leaves the old list or the new one);
- `clear_run` deletes exactly the recorded entries, under the run's lock (refused while a trainer
  holds the run);
- a folder without a manifest is cleared only when it is a diffusekit run written before manifests
  existed (its config.json has a run's sections: `is_run_folder`); then only the entries a run
  writes (`RUN_ENTRIES`) go. Any other folder is refused with one line, and nothing is deleted;
- `check_apart` refuses an output folder that is, contains or lies inside the data folder
  (resolved, symlinks followed), which `--overwrite` would otherwise empty.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Iterable

from ..config import ConfigError

MANIFEST_FILE = ".diffusekit-manifest.json"

# the top-level names a training run writes (diffusion, autoencoder and classifier trainers alike)
RUN_ENTRIES = ("config.json", "model.safetensors", "model_raw.safetensors", "trainer_state.pt", ".lock",
               "ckpt.tmp", "ckpt.ready", "checkpoint-*", "metrics.jsonl", "metrics.json", "loss.png", "samples",
               "README.md", "tensorboard", "wandb", "autoencoder", "tuned_steps.json", "classifier.safetensors",
               "reconstructions.png", "adapter.json", "finetune.json", "class_images", "*.tmp", MANIFEST_FILE)


def run_entries_present(run_dir: str | Path) -> list[str]:
    """The top-level entries of run_dir whose names a run writes (RUN_ENTRIES)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_ENTRIES))


def written(run_dir: str | Path) -> set[str] | None:
    """The top-level names recorded as written by diffusekit, or None when the folder has no manifest."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        names = json.loads(path.read_text())["written"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); delete the run's files by hand, or choose another "
                          f"output folder.") from None
    return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")}


def note_written(run_dir: str | Path, names: Iterable[str]) -> None:
    """Add top-level names to the run's manifest (created on first use)."""
    from .files import write_text_atomic
    before = written(run_dir) or set()
    after = before | {Path(n).name for n in names}
    if after != before or not (Path(run_dir) / MANIFEST_FILE).exists():
        write_text_atomic(Path(run_dir) / MANIFEST_FILE, json.dumps({"written": sorted(after)}, indent=1) + "\n")


def is_run_folder(folder: str | Path) -> bool:
    """A folder diffusekit trained into: it has a manifest, or (written before manifests) a config.json with
    a run's sections (a diffusion, autoencoder or classifier run)."""
    folder = Path(folder)
    if (folder / MANIFEST_FILE).exists():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("train"), dict) and \
        any(isinstance(config.get(k), dict) for k in ("model", "autoencoder", "classifier"))


def clear_run(run_dir: str | Path) -> list[str]:
    """Delete what diffusekit wrote in run_dir (nothing else); returns the names deleted.

    Refused (ConfigError) for a folder diffusekit did not write, and while a trainer holds the run."""
    folder = Path(run_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return []           # nothing there (a file in the way is refused when the run is written)
    names = written(folder)
    if names is None:
        if not is_run_folder(folder):
            raise ConfigError(f"--overwrite: {folder} is not a diffusekit run (no {MANIFEST_FILE} and no run "
                              f"config.json), so nothing in it is deleted; choose another --out.")
        names = set(run_entries_present(folder))
    from .lock import RunLock
    with RunLock(folder):          # refused, naming the process, while a trainer holds the run
        gone = sorted(n for n in names | {MANIFEST_FILE} if n != ".lock" and (folder / n).exists())
        for name in gone:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return gone


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_apart(out_dir: str | Path, data_source: str | Path | None) -> None:
    """Refuse an output folder that is, contains or lies inside the data folder (paths resolved)."""
    if not data_source or not Path(data_source).exists():
        return              # a built-in set ("digits", "shapes") or a data set that is not a path
    data, out = Path(data_source).resolve(), Path(out_dir).resolve()
    if data.is_file():          # a .npz or IDX file: refused only where the output folder holds it
        clash, where = _within(data, out), "contains"
    else:
        clash = _within(out, data) or _within(data, out)
        where = "is" if out == data else "lies inside" if _within(out, data) else "contains"
    if clash:
        raise ConfigError(f"the output folder {out_dir} {where} the data {data_source}; writing there (or "
                          f"--overwrite) could delete the training images. Choose an --out outside the data.")
