"""Noise floor of the evaluation metrics: FD, KID and precision/recall between two disjoint
random halves of the MNIST test set. Any model scoring near these numbers is indistinguishable
from real data at this sample size, for these features.

    .venv/bin/python bench/noise_floor.py --data path/to/mnist                        # raw pixels
    .venv/bin/python bench/noise_floor.py --data path/to/mnist --classifier runs/judge

--data is a folder with the MNIST IDX files (t10k-images-idx3-ubyte[.gz] is used). --classifier
is a folder written by `diffusekit train-classifier` (or its classifier.safetensors); without it
only raw-pixel features are measured.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffusekit.data import DataConfig, load_dataset
from diffusekit.evaluation import feature_extractor
from diffusekit.metrics import RawPixelFeatures, evaluate, extract_features


def load_mnist_test(folder: Path) -> torch.Tensor:
    """MNIST test images as (10000, 1, 28, 28) float32 in [-1, 1] (x = pixel / 127.5 - 1)."""
    return load_dataset(DataConfig(source=str(folder), split="t10k", class_labels=False)).images


def noise_floor(images: torch.Tensor, extractor, seed: int, kid_subset_size: int) -> dict:
    """Metrics between two disjoint random halves of images, split by a seeded permutation."""
    features = extract_features(images, extractor, batch_size=500)
    order = np.random.default_rng(seed).permutation(len(features))
    half = len(features) // 2
    fake, real = features[order[:half]], features[order[half:2 * half]]
    return evaluate(fake, real, kid_subset_size=kid_subset_size, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with the MNIST IDX files (the t10k split is used)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one random half/half split per seed")
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--classifier", type=Path, default=None,
                        help="a `diffusekit train-classifier` folder (or its .safetensors) for judge features")
    args = parser.parse_args()

    images = load_mnist_test(args.data)
    extractors = [RawPixelFeatures()]
    if args.classifier is not None:
        extractors.append(feature_extractor(f"classifier:{args.classifier}"))
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
