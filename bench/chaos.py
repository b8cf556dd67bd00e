"""Chaos: kill -9 during saves and reads, readers while a run trains, a full disk, two trainers on one run.

Everything runs on a tiny run (a 2-level, 8-channel UNet on 8x8 digits, --steps steps, a save every
--save-every) through real `python -m diffusekit` processes, and is compared with one uninterrupted
run of the same config. The processes run a copy of src/diffusekit taken at the start (through
PYTHONPATH), so that edits to the tree while the bench runs cannot mix two versions of the code into
one comparison. The counts (issue 13):

  kills survived        a trainer killed with SIGKILL, aimed at a save (while ckpt.tmp/ or ckpt.ready/
                        exists) or at a random moment, leaves a run that loads read-only (Pipeline.load)
                        and resumes (`train --resume`) to the end
  resumes bit-identical the final EMA and raw weights after the kills and resumes equal the
                        uninterrupted run's, bit for bit
  readers that disturbed a trainer   Pipeline.load + sample loops (some killed with SIGKILL mid-read
                        and restarted) and `diffusekit sample` processes while a trainer trains; the
                        trainer must exit 0 with the uninterrupted run's weights (goal 0)
  disk full             the file-size limit of a training process lowered mid-run (prlimit
                        RLIMIT_FSIZE): one line on stderr, exit 2, the previous checkpoint loads, and
                        the resume is bit-identical
  two trainers          a second `train` (fresh, --resume, --overwrite) on a run being trained (the first
                        paused with SIGSTOP meanwhile, so the second always meets it mid-run): refused in
                        one line naming the first's pid; the first finishes undisturbed
  bad inputs            the table of tests/cli/test_cli_errors.py through the CLI (click's CliRunner): exit 2,
                        a short message naming the file or option, no traceback, nothing written (goal: all)

Usage:  OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py [--kill-trials 3] [--reader-trials 1]
            [--disk-trials 2] [--trainer-trials 1] [--steps 10] [--save-every 2] [--seed 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusekit import store as ckpt

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}      # PYTHONPATH: see snapshot()

READER = r"""
import json, sys, time, torch
from pathlib import Path
from diffusekit import Pipeline
run, stop, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
log.write_text("")
ok = notyet = 0
errors = []
while not stop.exists():
    try:
        pipe = Pipeline.load(run, device="cpu")
        pipe.sample(2, "ddim", 2, generator=torch.Generator().manual_seed(0))
        ok += 1
    except FileNotFoundError:
        notyet += 1                      # before the first save: nothing to read yet
        time.sleep(0.05)
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
    with open(log, "a") as f:
        f.write(json.dumps({"ok": ok, "notyet": notyet, "errors": errors}) + "\n")
"""


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "diffusekit", *map(str, args)]


def start(cmd, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV, cwd=ROOT)


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def one_line_error(rc: int, log: Path) -> bool:
    """Exit code 2, no traceback, and the last line of stderr is click's 'Error: ...' message."""
    text = log.read_text(errors="replace")
    return rc == 2 and "Traceback" not in text and last_line(log).startswith("Error: ")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in (ckpt.EMA_FILE, ckpt.RAW_FILE) for k, v in load_file(run / name).items()}


def identical(run: Path, ref: dict[str, torch.Tensor]) -> bool:
    try:
        got = weights(run)
    except Exception:
        return False
    return got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def loads(run: Path) -> str:
    """'loads' if the committed checkpoint loads read-only, 'empty' if none was committed yet, else the error."""
    from diffusekit import Pipeline
    if ckpt.STATE_FILE not in ckpt.committed_files(run):
        return "empty"
    try:
        Pipeline.load(run, device="cpu")
        return "loads"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def wait_for(predicate, proc: subprocess.Popen | None, timeout: float = 300, poll: float = 0.001) -> bool:
    """Poll predicate() until true; False if proc ends or the time runs out first."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def saving(run: Path) -> bool:
    return (run / ckpt.TMP_DIR).exists() or (run / ckpt.READY_DIR).exists()


def kill_phase(run: Path) -> str:
    if (run / ckpt.READY_DIR).exists():
        return "in the move (committed, rolled forward later)"
    if (run / ckpt.TMP_DIR).exists():
        return "writing ckpt.tmp/ (discarded later)"
    return "between saves"


# ---------------------------------------------------------------------------------------------
# the trials


def committed_save(run: Path) -> tuple | None:
    """Changes with every completed save (trainer_state.pt is moved in last)."""
    try:
        st = os.stat(run / ckpt.STATE_FILE)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def saves_left(run: Path, args) -> int:
    done = ckpt.read_trainer_state(run, finish_interrupted=False)["step"] if committed_save(run) else 0
    return max(0, (args.steps - done) // args.save_every)


def kill_once(cmd, run: Path, log: Path, rng: random.Random, args, train_seconds: float) -> str | None:
    """Start cmd and SIGKILL it during a save (70%) or at a random moment; None if it finished first.

    Aimed: let a random number of saves complete (counted by trainer_state.pt being replaced), then
    poll every 0.2 ms for the next save's ckpt.tmp/ or ckpt.ready/ and kill at once or a few ms in.
    """
    left = saves_left(run, args)
    proc = start(cmd, log)
    if rng.random() < 0.7 and left:
        for _ in range(rng.randrange(left)):
            before = committed_save(run)
            wait_for(lambda: committed_save(run) != before, proc, poll=0.005)
        wait_for(lambda: saving(run), proc, poll=0.0002)
        time.sleep(rng.choice([0, rng.uniform(0, 0.003)]))
    else:
        wait_for(lambda: (run / ckpt.CONFIG_FILE).exists(), proc)
        time.sleep(rng.uniform(0, 0.7 * train_seconds))
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kill_phase(run)


def kill_trials(args, cfg: Path, work: Path, ref, rng: random.Random, train_seconds: float) -> dict:
    """Runs killed once or twice (the second kill hits the resumed process), then resumed to the end."""
    out, phases = Counter(), Counter()
    for trial in range(args.kill_trials):
        run, log = work / f"kill{trial}", work / f"kill{trial}.log"

        def command():
            if (run / ckpt.CONFIG_FILE).exists():
                return cli("train", "--out", run, "--resume")
            return cli("train", "--config", cfg, "--out", run)
        kills_ok = []
        for _ in range(rng.choice([1, 2])):
            phase = kill_once(command(), run, log, rng, args, train_seconds)
            if phase is None:
                break
            phases[phase] += 1
            state = loads(run)
            kills_ok.append(state in ("loads", "empty"))
            out["killed before the first save"] += state == "empty"
            if state not in ("loads", "empty"):
                print(f"  kill{trial}: the run does not load after the kill: {state}", file=sys.stderr)
        rc = subprocess.run(command(), stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV, cwd=ROOT).returncode
        if rc != 0:
            print(f"  kill{trial}: the resume failed ({rc}): {last_line(log)}", file=sys.stderr)
        out["kills"] += len(kills_ok)
        out["kills survived"] += sum(kills_ok) if rc == 0 else 0
        out["runs"] += 1
        out["resumes bit-identical"] += rc == 0 and identical(run, ref)
    return {**out, "kill phases": dict(phases)}


def start_reader(run: Path, stop: Path, work: Path, k: int) -> tuple[subprocess.Popen, Path]:
    log = work / f"reader{k}.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", READER, str(run), str(stop), str(log)],
                            stdout=subprocess.DEVNULL, stderr=open(work / f"reader{k}.err", "w"), env=ENV, cwd=ROOT)
    return proc, log


def reader_state(log: Path) -> dict:
    """The last complete record a reader wrote (a reader killed mid-write leaves half a line)."""
    for line in reversed(log.read_text().splitlines() if log.exists() else []):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {"ok": 0, "notyet": 0, "errors": []}


def reader_trial(trial: int, args, cfg: Path, work: Path, ref, rng: random.Random) -> dict:
    """Two reader loops (one killed and restarted at random) and `diffusekit sample` runs during training."""
    run, stop, out = work / f"read{trial}", work / f"read{trial}.stop", Counter()
    run.mkdir()
    readers = [start_reader(run, stop, work, 10 * trial + k) for k in range(2)]
    wait_for(lambda: all(log.exists() for _, log in readers), None, timeout=120, poll=0.05)
    trainer = start(cli("train", "--config", cfg, "--out", run), work / f"read{trial}.log")
    finished, spawned = [], 2
    while trainer.poll() is None:
        proc, log = readers[0]
        # kill reader 0 mid-read (once it has read at least once), then start a new one
        if reader_state(log)["ok"] and proc.poll() is None:
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            out["readers killed mid-read"] += 1
            finished.append(reader_state(log))
            readers[0] = start_reader(run, stop, work, 10 * trial + spawned)
            spawned += 1
        grid = work / f"read{trial}-sample.png"
        p = subprocess.run(cli("sample", run, "--n", 2, "--steps", 2, "--sampler", "ddim", "--out", grid),
                           capture_output=True, text=True, env=ENV, cwd=ROOT)
        missing = p.returncode == 2 and "is missing" in p.stderr           # before the first save
        out["sample processes"] += 1
        out["sample processes failed"] += p.returncode != 0 and not missing
    stop.touch()
    for proc, log in readers:
        proc.wait(timeout=120)
        finished.append(reader_state(log))
    out["reader loads"] = sum(s["ok"] for s in finished)
    out["reader errors"] = sum(len(s["errors"]) for s in finished)
    out["trainer exit code"] = trainer.returncode
    out["readers that disturbed the trainer"] = int(trainer.returncode != 0 or not identical(run, ref))
    return dict(out)


def disk_full_trial(trial: int, args, cfg: Path, work: Path, ref, rng: random.Random) -> dict:
    """Lower the trainer's file-size limit after its first save; the next write fails with EFBIG."""
    run, log = work / f"disk{trial}", work / f"disk{trial}.log"
    proc = start(cli("train", "--config", cfg, "--out", run), log)
    wait_for(lambda: ckpt.STATE_FILE in ckpt.committed_files(run), proc)
    saved = ckpt.read_trainer_state(run, finish_interrupted=False)["step"]
    limit = rng.randrange(1_000, 400_000)        # below trainer_state.pt (about 0.5 MB): the next save fails
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    except ProcessLookupError:
        pass
    rc = proc.wait()
    result = {"limit bytes": limit, "exit code": rc, "message": last_line(log)[:200],
              "one line": one_line_error(rc, log)}
    committed = ckpt.read_trainer_state(run, finish_interrupted=False)["step"]
    result["previous checkpoint loads"] = loads(run) == "loads" and committed >= saved
    p = subprocess.run(cli("train", "--out", run, "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT)
    result["resumed bit-identical"] = p.returncode == 0 and identical(run, ref)
    return result


def trainers_trial(trial: int, args, cfg: Path, work: Path, ref) -> dict:
    """A second trainer (fresh, --resume, --overwrite) while the first holds the run (paused with SIGSTOP)."""
    run = work / f"two{trial}"
    first = start(cli("train", "--config", cfg, "--out", run), work / f"two{trial}.log")
    wait_for(lambda: ckpt.STATE_FILE in ckpt.committed_files(run), first)
    first.send_signal(signal.SIGSTOP)
    seconds = {"fresh": ["--config", cfg], "--resume": ["--resume"], "--overwrite": ["--config", cfg, "--overwrite"]}
    result = {}
    try:
        for name, extra in seconds.items():
            log = work / f"two{trial}-{name.strip('-')}.log"
            rc = subprocess.run(cli("train", "--out", run, *extra), stdout=subprocess.DEVNULL,
                                stderr=open(log, "w"), env=ENV, cwd=ROOT).returncode
            result[f"second trainer {name} refused"] = one_line_error(rc, log) and \
                f"process {first.pid}" in last_line(log)
    finally:
        first.send_signal(signal.SIGCONT)
    result["first trainer undisturbed"] = first.wait() == 0 and identical(run, ref)
    return result


def bad_inputs(work: Path) -> dict:
    """The table of tests/cli/test_cli_errors.py: each bad input must be answered by one short message."""
    spec = importlib.util.spec_from_file_location("cli_error_table", ROOT / "tests" / "test_cli_errors.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    base = work / "table"
    base.mkdir()
    cfg = table.write_tiny_config(base)
    run = base / "tiny"
    with contextlib.redirect_stderr(io.StringIO()):
        assert table.invoke("train", "--config", cfg, "--out", run, "--seed", 5).exit_code == 0
    (base / "files").mkdir()
    files = table.write_input_files(base / "files")
    answered, failures = 0, []
    for name, damage, command, names in table.CASES:
        tmp = base / f"case-{name}"
        tmp.mkdir()
        target = table.damaged_copy(run, tmp / "run", damage) if damage else run
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                table.assert_user_error(table.invoke(*command(target, files, tmp, cfg)), *names)
            answered += 1
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0][:160]}")
    return {"bad inputs": len(table.CASES), "answered by one line": answered, "failures": failures}


# ---------------------------------------------------------------------------------------------


def snapshot(work: Path) -> None:
    """Run the child processes on a copy of the package as it is now (see the module docstring)."""
    shutil.copytree(ROOT / "src" / "diffusekit", work / "code" / "diffusekit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    ENV["PYTHONPATH"] = os.pathsep.join([str(work / "code"), *filter(None, [os.environ.get("PYTHONPATH")])])


def tiny_config(work: Path, args) -> Path:
    """The run config: the test table's tiny UNet, --steps steps, a save every --save-every."""
    r = subprocess.run(cli("train", "--data", "digits", "--out", work / "unused", "--dry-run"),
                       capture_output=True, text=True, env=ENV, cwd=ROOT, check=True)
    cfg = json.loads(r.stdout)
    cfg["model"].update(base_channels=8, groups=4, channel_mult=[1, 2], attention_resolutions=[], num_heads=1)
    cfg["train"].update(steps=args.steps, batch_size=16, sample_every=0, save_every=args.save_every, log_every=1,
                        warmup_steps=2, seed=args.seed)
    path = work / "chaos.json"
    path.write_text(json.dumps(cfg))
    return path


def summary(report: dict) -> dict:
    """The headline counts (goals: all survived and identical, no reader disturbs, every input one line)."""
    out = {}
    if "kill -9" in report:
        k = report["kill -9"]
        out["kills survived"] = f"{k['kills survived']} of {k['kills']}"
        out["resumes bit-identical (kill -9)"] = f"{k['resumes bit-identical']} of {k['runs']}"
    if "readers during training" in report:
        out["readers that disturbed a trainer"] = sum(r["readers that disturbed the trainer"]
                                                      for r in report["readers during training"])
    if "disk full" in report:
        d = report["disk full"]
        out["disk full: one line, checkpoint kept, resume bit-identical"] = \
            f"{sum(r['one line'] and r['previous checkpoint loads'] and r['resumed bit-identical'] for r in d)} of {len(d)}"
    if "two trainers" in report:
        t = [v for r in report["two trainers"] for k, v in r.items() if k.startswith("second")]
        out["second trainers refused in one line"] = f"{sum(t)} of {len(t)}"
        out["first trainers undisturbed"] = sum(r["first trainer undisturbed"] for r in report["two trainers"])
    if "bad inputs" in report:
        b = report["bad inputs"]
        out["bad inputs answered by one line"] = f"{b['answered by one line']} of {b['bad inputs']}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kill-trials", type=int, default=3, help="runs killed with SIGKILL (1 or 2 kills each)")
    p.add_argument("--reader-trials", type=int, default=1, help="trainings read by readers meanwhile")
    p.add_argument("--disk-trials", type=int, default=2, help="trainings whose disk fills up")
    p.add_argument("--trainer-trials", type=int, default=1, help="runs met by a second trainer (three kinds)")
    p.add_argument("--steps", type=int, default=10, help="training steps of the tiny run")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seeds the chaos (kill times, limits) and the run")
    p.add_argument("--sections", default="inputs,kill,readers,disk,trainers",
                   help="which parts to run, comma-separated (default: all)")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="chaos-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    snapshot(work)
    cfg = tiny_config(work, args)
    ref_start = time.time()
    subprocess.run(cli("train", "--config", cfg, "--out", work / "reference"), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT, check=True)
    train_seconds = time.time() - ref_start
    ref = weights(work / "reference")
    report = {"settings": {k: str(v) for k, v in vars(args).items()},
              "uninterrupted run seconds": round(train_seconds, 1)}
    # one random stream per part, so that each part's draws do not depend on which other parts ran
    rng = {key: random.Random(f"{args.seed}-{key}") for key in ("kill", "readers", "disk")}
    sections = [("bad inputs", lambda: bad_inputs(work)),
                ("kill -9", lambda: kill_trials(args, cfg, work, ref, rng["kill"], train_seconds)),
                ("readers during training", lambda: [reader_trial(i, args, cfg, work, ref, rng["readers"])
                                                     for i in range(args.reader_trials)]),
                ("disk full", lambda: [disk_full_trial(i, args, cfg, work, ref, rng["disk"])
                                       for i in range(args.disk_trials)]),
                ("two trainers", lambda: [trainers_trial(i, args, cfg, work, ref) for i in range(args.trainer_trials)])]
    chosen = args.sections.split(",")
    for key, (name, run_section) in zip(["inputs", "kill", "readers", "disk", "trainers"], sections):
        if key not in chosen:
            continue
        start_section = time.time()
        report[name] = run_section()
        print(f"{name} ({time.time() - start_section:.0f} s): {json.dumps(report[name])}", flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    report["summary"] = summary(report)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
