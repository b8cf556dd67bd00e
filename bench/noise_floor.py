"""Noise floor of the evaluation metrics: FD, KID and precision/recall between two disjoint
random halves of the MNIST test set. Any model scoring near these numbers is indistinguishable
from real data at this sample size, for these features.

    .venv/bin/python bench/noise_floor.py                      # raw-pixel features
    .venv/bin/python bench/noise_floor.py --classifier runs/judge/model.safetensors

The classifier hook expects a NoiseAwareClassifier state dict (.safetensors) with the
ClassifierConfig as config.json beside it; without --classifier that part is skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffusekit.data import read_idx
from diffusekit.metrics import ClassifierFeatures, RawPixelFeatures, evaluate, extract_features

ROOT = Path(__file__).resolve().parents[1]
MNIST_TEST = ROOT.parent / "shared/data/mnist/t10k-images-idx3-ubyte.gz"


def load_mnist_test(path: Path) -> torch.Tensor:
    """MNIST test images as (10000, 1, 28, 28) float32 in [-1, 1]."""
    pixels = torch.from_numpy(read_idx(path).copy())  # (N, 28, 28) uint8
    # x = pixel / 127.5 - 1, the same mapping as diffusekit.data.from_pixels
    return (pixels.float() / 127.5 - 1).unsqueeze(1)


def classifier_extractor(weights: Path | None):
    """ClassifierFeatures from a saved NoiseAwareClassifier, or None when none is given."""
    if weights is None:
        return None
    if not weights.is_file():
        print(f"skipping classifier features: {weights} does not exist")
        return None
    from safetensors.torch import load_file

    from diffusekit.nn.classifier import ClassifierConfig, NoiseAwareClassifier

    config = json.loads((weights.parent / "config.json").read_text())
    config = ClassifierConfig.from_dict(config.get("classifier", config))
    model = NoiseAwareClassifier(config)
    model.load_state_dict(load_file(weights))
    return ClassifierFeatures(model, name=f"classifier-{weights.parent.name}")


def noise_floor(images: torch.Tensor, extractor, seed: int, kid_subset_size: int) -> dict:
    """Metrics between two disjoint random halves of images, split by a seeded permutation."""
    features = extract_features(images, extractor, batch_size=500)
    order = np.random.default_rng(seed).permutation(len(features))
    half = len(features) // 2
    fake, real = features[order[:half]], features[order[half:2 * half]]
    return evaluate(fake, real, kid_subset_size=kid_subset_size, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MNIST_TEST)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one random half/half split per seed")
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--classifier", type=Path, default=None,
                        help="NoiseAwareClassifier .safetensors (config.json beside it)")
    args = parser.parse_args()

    images = load_mnist_test(args.data)
    extractors = [RawPixelFeatures()]
    if (clf := classifier_extractor(args.classifier)) is not None:
        extractors.append(clf)
    print(f"{len(images)} images from {args.data}; halves of {len(images) // 2}")
    for extractor in extractors:
        rows = []
        for seed in args.seeds:
            start = time.perf_counter()
            result = noise_floor(images, extractor, seed, args.kid_subset_size)
            rows.append(result)
            print(f"{extractor.name} seed={seed}: " + ", ".join(
                f"{k}={v:.6g}" for k, v in result.items())
                + f"  ({time.perf_counter() - start:.1f} s)")
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(f"{extractor.name} mean over {len(rows)} splits: " + json.dumps(means))


if __name__ == "__main__":
    main()
