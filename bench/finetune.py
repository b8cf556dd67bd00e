"""Fine-tuning on the emoji set: teach a text-to-image base an emoji it never saw, by LoRA, full fine-tuning
and DreamBooth with prior preservation, each within a CPU budget; measured with the emoji reader.

The base is a text-to-image run trained on the emoji set without the names of `emoji_split(rows)["new_names"]`
(bench/text_to_image_emoji.py: every style and skin tone of those names left out). One of those names
(--emoji, default: the first new name, in the split's order, with skin tones) is taught from a 4-image
instance folder written to OUT/instance: its two styles in two skin tones (--tones), the original PNGs
copied as a user would (transparent; the fine-tune reads them on the base's background). Instance prompt:
the emoji's name (--instance-prompt to change it), the caption a user gives a new emoji; the same prompt
asks for it before and after, so "before" is what the base makes of the unseen name.

Methods (`diffusekit.training.finetune`, each a run under OUT/runs/):
  lora         --method lora, the default adapter (rank 4, attention projections), lr --lora-lr
  lora-conv    the same adapting the convolutions too (--lora-targets attention,conv)
  lora-prior   the default adapter with dreambooth's prior preservation (diffusers' DreamBooth-LoRA)
  full         --method full, lr --full-lr
  dreambooth   --method full with prior preservation: --class-prompt, --num-class-images drawn by the base
               (inside the budget), prior loss weight 1 (diffusers' DreamBooth defaults), lr --full-lr
Budget: every fine-tune runs in this process on one thread, and its CPU time (time.process_time: opening
the base, class images, steps, saves) is at most --budget-cpu-min. The steps come from a throw-away probe
of the same settings (OUT/probe/METHOD): p steps, resumed to 3p, resumed again with nothing left to train
(setup only): CPU s per step = (T(p..3p) - T(setup)) / 2p; setup = T(0..p) - p * per step.

Scores (reader = bench/emoji_reader.py; the same starting noise for every model): the new emoji asked
--n-new times at each --scales guidance: share with its name in the reader's top 5 and top 1; forgetting:
one image per prompt of `emoji_split(rows)["seen_prompts"]` (200) at guidance --forget-scale: share with the
asked name in the top 5 (and top 1), and FD of the reader's features against the real images of every
training row (diffusekit.metrics). "real images": the reader on the new emoji's real images and on the 200
seen rows' (its ceiling, and the FD floor at n = 200); "base (other noise)": the base from other starting
noise (how much a 200-image score moves by chance). OUT/scores/MODEL.json keeps each model's numbers (delete
it to score again: the samples stay in OUT/samples/MODEL.safetensors, so a new reader costs no sampling) and
OUT/runs/METHOD.json each fine-tune's steps and CPU time, so processes with different --models may share
one OUT; --report writes OUT/table.md and the before/after grid.

    ARGS="--data ../shared/data/emoji --base BASE --reader runs/emoji-reader --out runs/ftbench"
    for m in lora full dreambooth; do OMP_NUM_THREADS=1 .venv/bin/python bench/finetune.py $ARGS --models $m & done
    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune.py $ARGS --models real base base-seed1; wait
    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune.py $ARGS --models --report --img-dir docs/img
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emoji_reader import features, load_emoji, load_reader  # noqa: E402
from finetune_scores import (copy_scores, draw, real_rows_score, score, seen_pairs,  # noqa: E402
                             unknown_words)
from text_to_image_emoji import emoji_split  # noqa: E402

from diffusekit import store  # noqa: E402
from diffusekit.metrics import feature_stats  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402
from diffusekit.training.finetune import finetune, finetune_config  # noqa: E402

METHODS = ("lora", "full", "dreambooth", "lora-conv", "lora-prior")
MODELS = ("real", "base", "base-seed1", *METHODS)          # what OUT/scores/NAME.json holds
LABELS = {"real": "real images", "base-seed1": "base (other noise)"}


# ---------------------------------------------------------------------------------------------
# the new emoji and its instance folder


def read_rows(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]


def choose_emoji(rows: list[dict], new_names: list[str], asked: str | None) -> str:
    """--emoji, else the first new name with skin tones (4 instance images exist), else the first new name."""
    if asked:
        if asked not in new_names:
            raise SystemExit(f"--emoji {asked!r} is not among the base's left-out names {new_names}.")
        return asked
    toned = [n for n in new_names if any(r["name"] == n and r["skin_tone"] for r in rows)]
    return (toned or list(new_names))[0]


def instance_rows(rows: list[dict], name: str, tones: list[str]) -> list[dict]:
    """The emoji's two styles in two skin tones (or in every image it has, up to 4, when it has no tones)."""
    mine = [r for r in rows if r["name"] == name]
    toned = [r for r in mine if r["skin_tone"] in tones]
    chosen = toned if len(toned) == 2 * len(tones) else mine[:4]
    return sorted(chosen, key=lambda r: (r["style"], r["skin_tone"] or ""))


def write_instance(folder: Path, data: Path, chosen: list[dict]) -> Path:
    """The instance folder: the chosen PNGs copied unchanged (no captions: the instance prompt names them)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for r in chosen:
        shutil.copyfile(data / r["file_name"], folder / r["file_name"].replace("/", "-"))
    (folder / "instance.json").write_text(json.dumps(chosen, indent=1) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# budgeted fine-tunes


def method_options(method: str, args, prompt: str) -> dict:
    common = {"instance_prompt": prompt, "train.device": "cpu", "train.sample_every": 0, "train.seed": args.seed,
              "train.batch_size": args.batch_size}
    prior = {"class_prompt": args.class_prompt, "num_class_images": args.num_class_images,
             "prior_loss_weight": 1.0} if method in ("dreambooth", "lora-prior") else {}
    if method.startswith("lora"):
        targets = {"adapter.targets": ("attention", "conv")} if method == "lora-conv" else {}
        return {**common, "method": "lora", "train.lr": args.lora_lr, "adapter.rank": args.lora_rank, **targets,
                **prior}
    return {**common, "method": "full", "train.lr": args.full_lr, **prior}


def cpu_call(fn) -> float:
    cpu0 = time.process_time()
    fn()
    return time.process_time() - cpu0


def run_finetune(base: Path, data: Path, run_dir: Path, options: dict, steps: int, resume: bool = False) -> float:
    """CPU seconds of one `finetune` call training run_dir to `steps` (one save, at the end)."""
    cfg = finetune_config(base, data, {**options, "train.steps": steps, "train.save_every": steps})
    return cpu_call(lambda: finetune(cfg, run_dir, resume=resume, progress=False))


def probe(base: Path, data: Path, folder: Path, options: dict, p: int) -> dict:
    """CPU seconds per step and of the setup (open, class images, save) of a fine-tune with these options."""
    if folder.exists():
        shutil.rmtree(folder)
    first = run_finetune(base, data, folder, options, p)
    more = run_finetune(base, data, folder, options, 3 * p, resume=True)
    setup = run_finetune(base, data, folder, options, 3 * p, resume=True)       # nothing left: setup only
    per_step = max(more - setup, 1e-6) / (2 * p)
    return {"per_step_cpu_s": per_step, "setup_cpu_s": max(first - p * per_step, 0.0), "probe_steps": p,
            "probe_cpu_s": [first, more, setup]}


def budgeted(base: Path, data: Path, out: Path, method: str, options: dict, budget_s: float, p: int) -> dict:
    """The fine-tune of `method` with as many steps as fit in budget_s (a finished one is read back): trained to
    75 % of the probe's estimate, then, by the CPU s per step measured there, resumed to the budget's end."""
    run_dir, record_path = out / "runs" / method, out / "runs" / f"{method}.json"
    if record_path.exists() and store.has_checkpoint(run_dir):
        return json.loads(record_path.read_text())
    costs = probe(base, data, out / "probe" / method, options, p)
    first = int(0.75 * (budget_s - costs["setup_cpu_s"]) / costs["per_step_cpu_s"])
    if first < 1:
        raise SystemExit(f"{method}: the setup alone ({costs['setup_cpu_s']:.0f} CPU s) fills the budget.")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    wall0 = time.time()
    cpu = [run_finetune(base, data, run_dir, options, first)]
    per_step = max(cpu[0] - costs["setup_cpu_s"], 1e-6) / first
    # the resume's own setup is the probe's setup-only call (no class images: they are cached)
    steps = first + max(int(0.98 * (budget_s - cpu[0] - costs["probe_cpu_s"][2]) / per_step), 0)
    if steps > first:
        cpu.append(run_finetune(base, data, run_dir, options, steps, resume=True))
    record = {"method": method, "steps": steps, "cpu_s": sum(cpu), "calls_cpu_s": cpu, "wall_s": time.time() - wall0,
              "threads": torch.get_num_threads(), "options": options, "probe": costs}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def weights_bytes(folder: Path) -> int:
    """Bytes of the weights a model of this folder samples with: its EMA file (adapter or network)."""
    return (folder / store.EMA_FILE).stat().st_size


def autoencoder_bytes(base: Path) -> int:
    """Bytes of the base run's copy of its autoencoder's weights (0 for a pixel model)."""
    path = base / "autoencoder" / store.EMA_FILE
    return path.stat().st_size if path.is_file() else 0


# ---------------------------------------------------------------------------------------------
# the grid, the table


@torch.no_grad()
def before_after_grid(pipes: dict, instance: torch.Tensor, prompt: str, seen: list[str], args, path: Path) -> Path:
    """One row per model (same noise in each column): the new emoji at the grid scale, then seen prompts; the
    instance images (real) on top."""
    from diffusekit.viz import save_labelled_grid
    prompts = [prompt] * args.grid_new + seen
    rows, labels = [], []
    for label, pipe in pipes.items():
        rows.append(draw(pipe, prompts, args.grid_scale, args.seed + 2, args))
        labels.append(label)
    size = rows[0].shape[-1]
    real = torch.nn.functional.interpolate(instance, size=(size, size), mode="area")
    blank = torch.ones(len(prompts) - len(real), *real.shape[1:])
    images = torch.cat([torch.cat([real, blank])[None], torch.stack(rows)]).flatten(0, 1)
    labels = ["real (taught)", *labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_labelled_grid(images, path, nrow=len(prompts), row_labels=labels)


def copy_cell(r: dict, scale: float) -> str:
    c = r.get("copy", {}).get(f"{scale:g}")
    if not c:
        return ""
    share = "" if c["copy_share"] is None else pct(c["copy_share"]) + " "
    return f"{share}({c['median_rmse']:.2f})"


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def table(out: Path, base: Path, scales: list[float]) -> str:
    """The markdown table of what OUT/scores and OUT/runs hold."""
    head = ["model", "CPU-min", "steps", "weights (share of base)"]
    head += [f"new top-5 / top-1 @ g{s:g}" for s in scales]
    head += ["seen top-5 / top-1", "seen FD", f"copies @ g{scales[-1]:g} (median RMSE)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base_bytes = weights_bytes(base)
    for label in MODELS:
        path = out / "scores" / f"{label}.json"
        if not path.exists():
            continue
        r, run_path = json.loads(path.read_text()), out / "runs" / f"{label}.json"
        run = json.loads(run_path.read_text()) if run_path.exists() else None
        cells = [LABELS.get(label, label), f"{run['cpu_s'] / 60:.2f}" if run else "", str(run["steps"]) if run else ""]
        size = weights_bytes(out / "runs" / label) if run else (base_bytes if label.startswith("base") else 0)
        cells.append(f"{size / 1e6:.2f} MB ({pct(size / base_bytes)})" if size else "")
        for s in scales:
            new = r["new"].get(f"{s:g}") or r["new"].get("real")
            cells.append(f"{pct(new['top5'])} / {pct(new['top1'])}" if new else "")
        seen = r["seen"]
        cells += [f"{pct(seen['top5'])} / {pct(seen['top1'])}", f"{seen['fd']:.1f}", copy_cell(r, scales[-1])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the emoji folder (../shared/data/emoji)")
    ap.add_argument("--base", type=Path, required=True, help="the text-to-image run trained without the new names")
    ap.add_argument("--reader", type=Path, required=True, help="a trained emoji reader folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--emoji", default=None, help="which left-out name to teach [first with skin tones]")
    ap.add_argument("--tones", nargs=2, default=["light", "dark"])
    ap.add_argument("--instance-prompt", default=None, help="[the emoji's name]")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS,
                    help="what to train (methods) and score here; scores already in OUT/scores are kept, so "
                         "several processes may share one OUT with different --models")
    ap.add_argument("--report", action="store_true", help="write OUT/table.md and the before/after grid")
    ap.add_argument("--budget-cpu-min", type=float, default=5.0)
    ap.add_argument("--probe-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=4, help="the adapters' rank (alpha = rank)")
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--class-prompt", default="an emoji")
    ap.add_argument("--num-class-images", type=int, default=100)
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n-new", type=int, default=32, help="samples of the new emoji per guidance scale")
    ap.add_argument("--forget-scale", type=float, default=2.0)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--grid-scale", type=float, default=4.0)
    ap.add_argument("--grid-new", type=int, default=6)
    ap.add_argument("--grid-seen", type=int, default=4)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-dir", type=Path, default=None, help="also write finetune_emoji.png here")
    return ap.parse_args()


class Bench:
    """What every model's score needs: the split, the new emoji and its instance folder, the reader, the reference."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        self.rows = read_rows(args.data)
        self.split = emoji_split(self.rows, seed=args.split_seed)
        self.name = choose_emoji(self.rows, self.split["new_names"], args.emoji)
        self.prompt = args.instance_prompt or self.name
        self.chosen = instance_rows(self.rows, self.name, args.tones)
        self.instance = self.out / "instance"
        if not (self.instance / "instance.json").exists():
            write_instance(self.instance, args.data, self.chosen)
        self.seen, self.seen_rows = seen_pairs(self.rows, self.split["seen_prompts"])
        self.reader = load_reader(args.reader)
        self._ref_stats = None

    @property
    def ref_stats(self):
        if self._ref_stats is None:
            ref, _ = load_emoji(self.args.data, size=self.reader.size, rows=self.split["train_rows"])
            self._ref_stats = feature_stats(features(self.reader, ref).double().numpy())
        return self._ref_stats

    def pipe(self, label: str):
        return Pipeline.load(self.args.base if label.startswith("base") else self.out / "runs" / label, device="cpu")

    def copies(self, label: str) -> dict:
        """copy_scores of label's cached samples of the new emoji."""
        from safetensors.torch import load_file
        instance, _ = load_emoji(self.args.data, size=self.reader.size, rows=self.chosen)
        taught = {r["file_name"] for r in self.chosen}
        others = [r for r in self.rows if r["name"] == self.name and r["file_name"] not in taught]
        other_images = load_emoji(self.args.data, size=self.reader.size, rows=others)[0] if others else instance[:0]
        drawn = load_file(self.out / "samples" / f"{label}.safetensors")
        return copy_scores(drawn, instance, other_images, self.args.scales, self.args.n_new)

    def score(self, label: str) -> dict:
        """OUT/scores/label.json: computed unless there (a score without the copy check gains it)."""
        path = self.out / "scores" / f"{label}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if "copy" not in result and label != "real" and (self.out / "samples" / f"{label}.safetensors").exists():
                result["copy"] = self.copies(label)
                path.write_text(json.dumps(result, indent=1) + "\n")
            return result
        a = self.args
        if label == "real":
            mine = [r for r in self.rows if r["name"] == self.name]
            result = real_rows_score(self.reader, a.data, mine, self.seen_rows, self.ref_stats)
        else:
            seed = a.seed + 10 if label == "base-seed1" else a.seed
            result = score(self.pipe(label), self.reader, self.name, self.prompt, self.seen, self.ref_stats, a, seed,
                           self.out / "samples" / f"{label}.safetensors")
            result["copy"] = self.copies(label)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    b = Bench(args)
    about = {"emoji": b.name, "instance_prompt": b.prompt, "instance": [r["file_name"] for r in b.chosen],
             "new_names": b.split["new_names"], "unknown_words": unknown_words(b.pipe("base"), b.prompt),
             "base": str(args.base), "base_unet_bytes": weights_bytes(args.base),
             "base_autoencoder_bytes": autoencoder_bytes(args.base)}
    (args.out / "about.json").write_text(json.dumps(about, indent=1) + "\n")
    print(f"teaching {b.name!r} (prompt {b.prompt!r}) from {about['instance']}", flush=True)
    for label in args.models:
        if label in METHODS:
            run = budgeted(args.base, b.instance, args.out, label, method_options(label, args, b.prompt),
                           60 * args.budget_cpu_min, args.probe_steps)
            print(f"{label}: {run['steps']} steps in {run['cpu_s'] / 60:.2f} CPU-min", flush=True)
        print(f"{label}: {b.score(label)}", flush=True)
    if args.report:
        text = table(args.out, args.base, args.scales)
        (args.out / "table.md").write_text(text + "\n")
        print(text, flush=True)
        have = [m for m in ("base", *METHODS) if (args.out / "scores" / f"{m}.json").exists()]
        instance_images, _ = load_emoji(args.data, size=b.reader.size, rows=b.chosen)
        for folder in [args.out] + ([args.img_dir] if args.img_dir else []):
            before_after_grid({m: b.pipe(m) for m in have}, instance_images, b.prompt,
                              b.split["seen_prompts"][:args.grid_seen], args, folder / "finetune_emoji.png")


if __name__ == "__main__":
    main()
