"""Checkpoint history: RUN/checkpoint-STEP/ folders beside the latest save, and which one a resume reads.

After each save the trainer keeps it as RUN/checkpoint-STEP/, hard links to the files just committed
(no extra disk until the next save replaces them), and deletes the oldest beyond a limit. A resume
reads the run itself ("latest"), one of these folders (a step), or any checkpoint folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .files import CheckpointError
from .journal import COMMIT_ORDER, STATE_FILE

HISTORY_PREFIX = "checkpoint-"


def checkpoint_history(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoint-STEP/ folders, oldest first."""
    out = []
    for path in Path(run_dir).glob(f"{HISTORY_PREFIX}*"):
        suffix = path.name[len(HISTORY_PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).exists():
            out.append((int(suffix), path))
    return sorted(out)


def snapshot_checkpoint(run_dir: str | Path, step: int, keep: int) -> Path:
    """Keep the save just committed as RUN/checkpoint-STEP/ (hard links: no extra disk until the next save
    replaces the files) and delete the oldest folders beyond `keep` (0 = keep every one)."""
    run_dir = Path(run_dir)
    target = run_dir / f"{HISTORY_PREFIX}{step}"
    tmp = run_dir / f"{HISTORY_PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in COMMIT_ORDER:
        src = run_dir / name
        if src.exists():
            try:
                os.link(src, tmp / name)       # the next save os.replace()s the name; this inode stays
            except OSError:
                shutil.copy2(src, tmp / name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    history = checkpoint_history(run_dir)
    for _, old in history[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def resume_folder(run_dir: str | Path, resume_from: str | int | None) -> Path:
    """The folder a resume reads: the run itself ("latest"/None), RUN/checkpoint-STEP (a step), or a path."""
    run_dir = Path(run_dir)
    if resume_from in (None, "latest"):
        return run_dir
    text = str(resume_from)
    if text.isdigit():
        folder = run_dir / f"{HISTORY_PREFIX}{int(text)}"
        if not (folder / STATE_FILE).exists():
            steps = [s for s, _ in checkpoint_history(run_dir)]
            raise CheckpointError(f"{run_dir} has no checkpoint at step {text}; its checkpoints are at steps "
                                  f"{steps or 'none (only the latest save)'}: use --resume latest or one of those.")
        return folder
    folder = Path(text)
    if not (folder / STATE_FILE).exists():
        raise CheckpointError(f"--resume {text}: {folder} holds no {STATE_FILE}; give latest, a step of "
                              f"{run_dir}'s checkpoint-STEP folders, or a checkpoint folder.")
    return folder

