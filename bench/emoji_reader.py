"""An emoji reader: which emoji (name), category, skin tone and artist's style an image shows, and
its penultimate features for Frechet distances (as bench/shapes_reader.py is for the shapes).

A small conv net (four stages 32 -> 16 -> 8 -> 4 px, BatchNorm + SiLU, two convolutions a stage,
global average pooling, a 256-wide feature layer) with four linear heads, trained on the real emoji
(../shared/data/emoji) composited on WHITE, as diffusekit's own data reader gives them
(`DataConfig(alpha_background="white", image_size=size)`: bicubic antialiased resize from 64).
A seeded random 10 % of the images is held out of training and gives the accuracies per head.

Augmentations keep identity: a small random translation (up to 2 px a side at 32 px, white fill)
and a slight random scale (0.9 to 1.1), plus pixel noise of std 0.03. No flips (arrows, hands and
letters are asymmetric: a flip can turn one emoji into another) and no colour changes (they would
erase skin tone and an artist's palette). Training: 1,200 AdamW steps of batch 96 (~17 epochs),
about 7 CPU-minutes on one thread (on this shared 2-core machine two threads cost 5x the CPU time per
step: use OMP_NUM_THREADS=1). A finished out_dir (reader.safetensors + reader.json) is reused, never
retrained. Other sizes: the 32 px reader reads 64 px (or any) images by resizing them to 32 px inside
`read`/`features` (bicubic, antialiased, as the data reader resizes); `--size 64` trains a 64 px reader.

    OMP_NUM_THREADS=1 .venv/bin/python bench/emoji_reader.py train --data ../shared/data/emoji --out runs/emoji-reader
    OMP_NUM_THREADS=1 .venv/bin/python bench/emoji_reader.py check --data ../shared/data/emoji --reader runs/emoji-reader
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.data import DataConfig, index_folder
from diffusekit.data.dataset import load_folder
from diffusekit.data.images import resize_shorter_side

HEADS = ("name", "category", "tone", "style")
WEIGHTS, RECORD = "reader.safetensors", "reader.json"
NO_TONE = "none"


# ---------------------------------------------------------------------------------------------
# data


def load_emoji(data_dir, size: int = 32, background: str = "white",
               rows: list[dict] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The emoji images (N, 3, size, size) float in [-1, 1] and their metadata rows, in one order.

    Read by diffusekit's own folder reader (metadata.jsonl, alpha composited onto `background`,
    bicubic antialiased resize from 64 px). rows: only these rows (dicts with `file_name`), in their
    order; None: every image, in the folder's (file name) order.
    """
    cfg = DataConfig(source=str(data_dir), image_size=0 if size == 64 else size, channels=3,
                     alpha_background=background, class_labels=False)
    index = index_folder(cfg)
    root = Path(index.root)
    names = [p.relative_to(root).as_posix() for p in index.files]
    if rows is not None:
        where = {n: i for i, n in enumerate(names)}
        missing = [r["file_name"] for r in rows if r["file_name"] not in where]
        if missing:
            raise ValueError(f"{len(missing)} rows name images that {data_dir} does not list (e.g. {missing[0]!r}); "
                             "pass rows read from this folder's metadata.jsonl.")
        index = index.subset([where[r["file_name"]] for r in rows])
        names = [r["file_name"] for r in rows]
    data = load_folder(index, cfg)
    if data.images.shape[-1] != size:
        data.images = resize_to(data.images, size)
    columns = data.attributes or {}
    out = [{"file_name": n, "text": data.captions[i] if data.captions else None,
            **{k: v[i] for k, v in columns.items()}} for i, n in enumerate(names)]
    return data.images, out


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] resized to size x size as the data reader resizes (bicubic, antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return resize_shorter_side((images.float() + 1) / 2, size) * 2 - 1


def tone_of(row: dict) -> str:
    return row.get("skin_tone") or NO_TONE


def row_labels(row: dict) -> dict[str, str]:
    """The value of each head for one metadata row."""
    return {"name": row["name"], "category": row["category"], "tone": tone_of(row), "style": row["style"]}


def label_tensors(rows: list[dict], vocab: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """{head: (N,) long} indices into vocab[head]; -1 for a value the vocabulary lacks."""
    index = {h: {v: i for i, v in enumerate(vocab[h])} for h in HEADS}
    return {h: torch.tensor([index[h].get(row_labels(r)[h], -1) for r in rows]) for h in HEADS}


def heldout_split(n: int, seed: int = 0, fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) sorted index tensors: a seeded random `fraction` of n held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(n * fraction))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


# ---------------------------------------------------------------------------------------------
# the network


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.SiLU())


class EmojiReader(nn.Module):
    """Images (B, 3, size, size) in [-1, 1] -> {head: logits} plus "features" (B, feature_dim)."""

    def __init__(self, vocab: dict[str, list[str]], size: int = 32, width: int = 32, feature_dim: int = 256):
        super().__init__()
        self.vocab, self.size = {h: list(vocab[h]) for h in HEADS}, size
        self.config = {"size": size, "width": width, "feature_dim": feature_dim}
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, c = [conv_block(3, widths[0])], widths[0]
        stages = int(math.log2(size // 4))                        # 32 -> 4 px: 3 downsamplings
        for i in range(1, stages + 1):
            w = widths[min(i, len(widths) - 1)]
            layers += [conv_block(c, w, stride=2), conv_block(w, w)]
            c = w
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.Linear(c, feature_dim), nn.BatchNorm1d(feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({h: nn.Linear(feature_dim, len(self.vocab[h])) for h in HEADS})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {**{h: head(f) for h, head in self.heads.items()}, "features": f}


# ---------------------------------------------------------------------------------------------
# reading images


def _prepare(reader: EmojiReader, images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the emoji reader reads RGB images (B, 3, H, W) in [-1, 1]; got {tuple(images.shape)}.")
    return resize_to(images.float(), reader.size)


@torch.no_grad()
def read(reader: EmojiReader, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """{head: logits (B, classes)} and "features" (B, D) for images (B, 3, H, W) in [-1, 1], any H = W."""
    reader.eval()
    parts = [reader(_prepare(reader, x)) for x in images.split(batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in (*HEADS, "features")}


@torch.no_grad()
def features(reader: EmojiReader, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate features (B, D) for Frechet distances."""
    reader.eval()
    return torch.cat([reader.features(_prepare(reader, x)) for x in images.split(batch_size)])


def name_topk(reader: EmojiReader, images: torch.Tensor, names: list[str], k: int = 5) -> torch.Tensor:
    """Bool (B,): whether the asked name is among the reader's top k for each image (False for an unknown name)."""
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names; give one asked name per image.")
    index = {v: i for i, v in enumerate(reader.vocab["name"])}
    target = torch.tensor([index.get(n, -1) for n in names])
    top = read(reader, images)["name"].topk(min(k, len(index)), dim=1).indices
    return (top == target[:, None]).any(dim=1) & (target >= 0)


def accuracy(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Top-1 per head, and top-5 for the name."""
    out = {h: (logits[h].argmax(1) == targets[h]).float().mean().item() for h in HEADS}
    top5 = logits["name"].topk(min(5, logits["name"].shape[1]), dim=1).indices
    out["name_top5"] = (top5 == targets["name"][:, None]).any(1).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------
# training


def augment(x: torch.Tensor, g: torch.Generator, shift: float = 2 / 32, scale: float = 0.1,
            noise: float = 0.03) -> torch.Tensor:
    """A random small translation and scale per image (white fill), and pixel noise."""
    b = x.shape[0]
    s = 1 + (torch.rand(b, generator=g) * 2 - 1) * scale
    t = (torch.rand(b, 2, generator=g) * 2 - 1) * shift * 2              # grid units: 2 = the whole image
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / s, 1 / s, t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # white outside: shift to [0, 2] (white = 2), pad with zeros, and back
    y = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    return y + noise * torch.randn(y.shape, generator=g)


def vocabularies(rows: list[dict]) -> dict[str, list[str]]:
    return {h: sorted({row_labels(r)[h] for r in rows}) for h in HEADS}


def _fit(reader: EmojiReader, images: torch.Tensor, targets: dict, train_idx: torch.Tensor, steps: int,
         batch_size: int, lr: float, seed: int, log=None) -> float:
    """Cross-entropy summed over the heads, AdamW with a one-cycle schedule; the last loss.

    log(step, loss) is called every 100 steps when given (the CLI prints progress with it)."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    reader.train()
    for step in range(1, steps + 1):
        idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=g)]
        out = reader(augment(images[idx], g))
        loss = sum(F.cross_entropy(out[h], targets[h][idx], label_smoothing=0.1) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and step % 100 == 0:
            log(step, loss.item())
    return loss.item()


def train_reader(data_dir, out_dir, size: int = 32, seed: int = 0, steps: int = 1200, batch_size: int = 96,
                 lr: float = 3e-3, width: int = 32, feature_dim: int = 256, log=None, **kw) -> Path:
    """Train the reader on the emoji folder (or reuse a finished out_dir); returns out_dir."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    if (out / WEIGHTS).is_file() and (out / RECORD).is_file():
        return out
    if kw:
        raise TypeError(f"train_reader got unknown options {sorted(kw)}")
    out.mkdir(parents=True, exist_ok=True)
    cpu0, wall0 = time.process_time(), time.time()
    images, rows = load_emoji(data_dir, size)
    vocab = vocabularies(rows)
    targets = label_tensors(rows, vocab)
    train_idx, held_idx = heldout_split(len(rows), seed)
    torch.manual_seed(seed)
    reader = EmojiReader(vocab, size, width, feature_dim)
    loss = _fit(reader, images, targets, train_idx, steps, batch_size, lr, seed, log)
    logits = read(reader, images[held_idx])
    record = {"size": size, "config": reader.config, "vocab": vocab, "seed": seed,
              "heldout_files": [rows[i]["file_name"] for i in held_idx],
              "heldout_accuracy": accuracy(logits, {h: t[held_idx] for h, t in targets.items()}),
              "n_train": len(train_idx), "n_heldout": len(held_idx), "steps": steps, "batch_size": batch_size,
              "lr": lr, "final_loss": loss, "threads": torch.get_num_threads(),
              "cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0}
    save_file({k: v.contiguous() for k, v in reader.state_dict().items()}, str(out / WEIGHTS))
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")   # written last: marks the folder finished
    return out


def load_reader(out_dir) -> EmojiReader:
    """The trained reader of out_dir, in eval mode (safetensors weights; nothing unpickled)."""
    from safetensors.torch import load_file
    out = Path(out_dir)
    if not (out / WEIGHTS).is_file() or not (out / RECORD).is_file():
        raise FileNotFoundError(f"{out} holds no trained emoji reader ({WEIGHTS} and {RECORD}); train one: "
                                f"python bench/emoji_reader.py train --data ../shared/data/emoji --out {out}")
    record = json.loads((out / RECORD).read_text())
    reader = EmojiReader(record["vocab"], **record["config"])
    reader.load_state_dict(load_file(str(out / WEIGHTS)))
    return reader.eval()


def load_record(out_dir) -> dict:
    return json.loads((Path(out_dir) / RECORD).read_text())


# ---------------------------------------------------------------------------------------------
# does the measuring stick see what it must


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between two feature sets (N, D), by diffusekit.metrics."""
    from diffusekit.metrics import feature_stats, frechet_distance
    return frechet_distance(*feature_stats(a.double().numpy()), *feature_stats(b.double().numpy()))


def blur16(images: torch.Tensor) -> torch.Tensor:
    """Down to 16 px and back up (bicubic, antialiased): the detail a 16 px image keeps."""
    return resize_to(resize_to(images, 16), images.shape[-1])


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A separable Gaussian blur of std `sigma` px (edges replicated)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def bad_sets(images: torch.Tensor, rows: list[dict], half_a: torch.Tensor, g: torch.Generator,
             category: str = "People & Body") -> dict[str, torch.Tensor]:
    """Image sets of half A's size that a good FD must tell from the real mix (see `check`)."""
    n = len(half_a)
    a = images[half_a]
    few = half_a[torch.randperm(n, generator=g)[:max(1, n // 10)]]
    copies = few.repeat(math.ceil(n / len(few)))[:n]
    noto = torch.tensor([i for i, r in enumerate(rows) if r["style"] == "noto"])
    in_cat = torch.tensor([i for i, r in enumerate(rows) if r["category"] == category])
    pick = lambda idx: idx[torch.randint(len(idx), (n,), generator=g)] if len(idx) < n \
        else idx[torch.randperm(len(idx), generator=g)[:n]]  # noqa: E731
    return {"blur16": blur16(a), "gauss1": gaussian_blur(a, 1.0), "noto_only": images[pick(noto)],
            "copies10pct": images[copies], "one_category": images[pick(in_cat)]}


def check(data_dir, reader_dir, seed: int = 0) -> dict:
    """Held-out accuracy, name top-5 on 16 px-blurred real images, and FD ratios to the two-halves floor.

    The floor is the FD between two random halves (A, B) of the real set. Every bad set has A's size
    and is compared with B: A blurred to 16 px and back, A Gaussian-blurred (sigma 1 px), the noto
    images only (the real set's style mix is half and half), a tenth of A repeated ten times (copies),
    and one category (People & Body) only. Also: A read at 64 px (resized inside `features`) against
    B at the reader's size, which should sit at the floor.
    """
    reader = load_reader(reader_dir)
    record = load_record(reader_dir)
    images, rows = load_emoji(data_dir, reader.size)
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(len(rows), generator=g)
    half_a, half_b = perm[: len(rows) // 2], perm[len(rows) // 2:]
    feats_b = features(reader, images[half_b])
    floor = frechet(features(reader, images[half_a]), feats_b)
    n_small = 1000
    floor_small = frechet(features(reader, images[half_a[:n_small]]), features(reader, images[half_b[:n_small]]))
    fds = {k: frechet(features(reader, x), feats_b) for k, x in bad_sets(images, rows, half_a, g).items()}
    big, _ = load_emoji(data_dir, 64) if reader.size != 64 else (images, rows)
    fd64 = frechet(features(reader, big[half_a]), feats_b)          # 64 px images, resized inside features
    names = [r["name"] for r in rows]
    held = set(record["heldout_files"])
    is_held = torch.tensor([r["file_name"] in held for r in rows])
    blurred_top5 = name_topk(reader, blur16(images), names)
    sharp_top5 = name_topk(reader, images, names)
    return {"reader": str(reader_dir), "size": reader.size, "heldout_accuracy": record["heldout_accuracy"],
            "n_half": len(half_a), "fd_floor_two_halves": floor, f"fd_floor_two_{n_small}": floor_small,
            "fd": fds, "fd_ratio_to_floor": {k: v / floor for k, v in fds.items()},
            "fd_ratio_real64_read_resized": fd64 / floor,
            "name_top5_all_real": sharp_top5.float().mean().item(),
            "name_top5_blur16_all_real": blurred_top5.float().mean().item(),
            "name_top5_blur16_heldout": blurred_top5[is_held].float().mean().item(),
            "train_cpu_s": record["cpu_s"], "train_steps": record["steps"]}


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the reader (a finished --out is reused) and print its held-out accuracy")
    t.add_argument("--data", type=Path, required=True, help="the emoji image folder (metadata.jsonl)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="accuracies, blurred top-5 and FD ratios of a trained reader")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--reader", type=Path, required=True)
    c.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.command == "train":
        def log(step, loss):
            print(f"step {step}/{args.steps}: loss {loss:.3f}, {time.process_time():.0f} CPU s", file=sys.stderr, flush=True)
        out = train_reader(args.data, args.out, size=args.size, seed=args.seed, steps=args.steps, log=log)
        record = load_record(out)
        print(json.dumps({k: record[k] for k in ("heldout_accuracy", "n_train", "n_heldout", "steps",
                                                 "cpu_s", "wall_s", "threads")}, indent=1))
        return
    result = check(args.data, args.reader)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    if "torch" in sys.modules and "OMP_NUM_THREADS" not in __import__("os").environ:
        torch.set_num_threads(1)   # the machine is shared: one thread unless asked otherwise
    main()
