"""An attribute reader for the built-in shapes: which size, colour, shape and position an image shows.

A small conv net with one linear head per attribute of diffusekit.data.shapes.ATTRIBUTES, trained
on the generator's own renders (split "train") with cross-entropy summed over the four heads, and
checked on held-out renders (split "test"). It scores prompt adherence of generated images:
an attribute is right when the reader's value equals the prompt's, and "joint" when all four are.

Training images get a little Gaussian noise (std 0.05) so that the reader does not depend on the
exactly flat black background of the renders; generated images are never perfectly flat.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shapes_reader.py --out runs/reader    # trains, prints accuracy
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from diffusekit.data.shapes import ATTRIBUTES, generate_shapes

WEIGHTS = "reader.pt"
METRICS = "reader.json"


class AttributeReader(nn.Module):
    """Images (B, 3, 32, 32) in [-1, 1] -> {attribute: logits (B, number of values)}.

    Three convolutions (32 -> 16 -> 8 pixels) and a flattened 8x8 map: position needs where the
    shape is, so the features are not pooled over space.
    """

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),       # 32 -> 16
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),   # 16 -> 8
            nn.Flatten(), nn.Linear(2 * width * 64, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}


def attribute_indices(attributes: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """{attribute: value names} -> {attribute: (N,) long indices into ATTRIBUTES[attribute]}."""
    return {name: torch.tensor([ATTRIBUTES[name].index(v) for v in attributes[name]]) for name in ATTRIBUTES}


def caption_attributes(caption: str) -> dict[str, str]:
    """The attributes a shapes caption names ("a large red circle on the left" -> size large, ...)."""
    words = caption.split()
    position = next(p for p in ATTRIBUTES["position"] if caption.endswith(p))
    return {"size": words[1], "colour": words[2], "shape": words[3], "position": position}


@torch.no_grad()
def read(reader: AttributeReader, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """The reader's value index per attribute for images (N, 3, 32, 32) in [-1, 1]."""
    reader.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in ATTRIBUTES}
    for x in images.split(batch_size):
        for name, logits in reader(x.float()).items():
            out[name].append(logits.argmax(dim=1))
    return {name: torch.cat(v) for name, v in out.items()}


def adherence(predicted: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of images whose read attribute equals the asked one, per attribute and all four at once ("joint")."""
    right = {name: predicted[name] == target[name] for name in ATTRIBUTES}
    joint = torch.stack(list(right.values())).all(dim=0)
    return {**{name: r.float().mean().item() for name, r in right.items()}, "joint": joint.float().mean().item()}


def train_reader(out: Path, steps: int = 600, batch_size: int = 128, n_train: int = 20000, n_test: int = 2000,
                 seed: int = 0) -> tuple[AttributeReader, dict]:
    """Train (or load, when out/reader.pt exists) the reader; returns it and its held-out accuracy record."""
    out.mkdir(parents=True, exist_ok=True)
    reader = AttributeReader()
    if (out / WEIGHTS).exists():
        reader.load_state_dict(torch.load(out / WEIGHTS, weights_only=True))
        return reader.eval(), json.loads((out / METRICS).read_text())
    cpu0, wall0 = time.process_time(), time.time()
    images, _, attributes = generate_shapes(n_train, seed=seed, split="train")
    images, targets = images * 2 - 1, attribute_indices(attributes)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reader = AttributeReader()
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    reader.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx] + 0.05 * torch.randn(images[idx].shape, generator=g)
        logits = reader(x)
        loss = sum(F.cross_entropy(logits[name], targets[name][idx]) for name in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    test_images, _, test_attributes = generate_shapes(n_test, seed=seed, split="test")
    accuracy = adherence(read(reader, test_images * 2 - 1), attribute_indices(test_attributes))
    record = {"heldout_accuracy": accuracy, "n_train": n_train, "n_test": n_test, "steps": steps,
              "batch_size": batch_size, "final_loss": loss.item(), "cpu_s": time.process_time() - cpu0,
              "wall_s": time.time() - wall0}
    torch.save(reader.state_dict(), out / WEIGHTS)
    (out / METRICS).write_text(json.dumps(record, indent=2) + "\n")
    return reader.eval(), record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    _, record = train_reader(args.out, steps=args.steps)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
