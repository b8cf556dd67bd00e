"""Evaluating a trained run: generate samples, extract features, compare with a reference data set.

`evaluate_run(pipe, ref, n, sampler=..., num_steps=..., features=..., seed=...)` returns Frechet
distance, KID, precision/recall (diffusekit.metrics) with the sampler, its step count, the honest
number of network evaluations per sample (NFE) and the generation time. Reference statistics are
cached per (data source, split, size, count, feature extractor), so scoring many checkpoints or
samplers extracts the reference features once.

Under torchrun (WORLD_SIZE > 1) the ranks split the batches that one process would generate
(batch i covers samples i * batch_size onwards and is seeded by (seed, its first sample)), so the
same images are scored, and the same numbers returned, whatever the number of processes. Rank 0
gathers the features and computes the metrics; the other ranks return only {"rank": r, "n_local": ...}.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from diffusekit import metrics as M
from diffusekit.data import DataConfig, ImageDataset, load_dataset
from diffusekit.progress import bar as progress_bar
from diffusekit.seeding import derive_seed

FEATURE_KINDS = ("raw", "classifier:PATH", "inception:WEIGHTS")


# ---------------------------------------------------------------------------------------------
# features


def _file_digest(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def feature_extractor(spec: str, device: str | torch.device = "cpu") -> M.FeatureExtractor:
    """Build the extractor a spec names: "raw", "classifier:PATH" (a train_classifier folder or file)
    or "inception:WEIGHTS" (pytorch-fid's pt_inception-2015-12-05-6726825d.pth).

    Classifier extractors are named after a digest of their weights, so caches never mix judges.
    """
    kind, _, arg = spec.partition(":")
    if kind == "raw" and not arg:
        return M.RawPixelFeatures()
    if kind == "classifier" and arg:
        from diffusekit.store.classifier import load_classifier, weights_path
        model, _ = load_classifier(arg, device=device)
        return M.ClassifierFeatures(model, name=f"classifier-{_file_digest(weights_path(arg))}")
    if kind == "inception" and arg:
        from diffusekit.nn.inception import InceptionFeatures
        return InceptionFeatures(arg, device=device)
    raise ValueError(f"features={spec!r} is not understood; use one of {list(FEATURE_KINDS)}, e.g. "
                     f"'classifier:runs/judge'.")


def reference_key(ref: DataConfig, count: int) -> str:
    """Cache key of a reference set: source name, a digest of its full path, split, size and count."""
    if ref.source == "digits" or ref.kind == "digits":
        base = "digits"
    else:
        path = Path(ref.source).expanduser().resolve()
        name = re.sub(r"[^A-Za-z0-9._+=-]", "_", path.name) or "data"
        base = f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    name = f"{base}-{ref.split}-s{ref.image_size}-c{ref.channels}"
    return M.dataset_key(name, count)


def reference_statistics(ref: DataConfig, extractor: M.FeatureExtractor, cache_dir: str | Path,
                         batch_size: int = 256, dataset: ImageDataset | None = None) -> M.ReferenceStats:
    """metrics.reference_stats of the reference data set, cached under cache_dir."""
    dataset = dataset if dataset is not None else load_dataset(ref)
    return M.reference_stats(dataset.images, extractor, cache_dir, reference_key(ref, len(dataset)),
                             batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# generation


class _CallCounter:
    """Forward hook counting images passed through a network (batch sizes summed over calls)."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_hook(self) if isinstance(module, torch.nn.Module) else None

    def __call__(self, module, args, output):
        if args and isinstance(args[0], torch.Tensor):
            self.images += args[0].shape[0]

    def close(self):
        if self.handle is not None:
            self.handle.remove()


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _share(n: int, rank: int, world: int, batch_size: int = 1) -> tuple[int, int]:
    """(start, count) of this rank's samples: whole batches of the one-process grid, consecutive,
    the first (number of batches) % world ranks taking one batch more."""
    num_batches = -(-n // batch_size)
    base, extra = divmod(num_batches, world)
    first = rank * base + min(rank, extra)
    start, end = (min(b * batch_size, n) for b in (first, first + base + (rank < extra)))
    return start, end - start


def _labels(pipe, class_labels, start: int, count: int) -> torch.Tensor | None:
    num_classes = int(getattr(pipe, "num_classes", 0) or 0)
    if class_labels is None or num_classes == 0:
        return None
    if isinstance(class_labels, str):
        if class_labels != "uniform":
            raise ValueError(f"class_labels={class_labels!r}; use 'uniform', None or a tensor of labels.")
        # balanced classes: sample k gets class k mod K
        return torch.arange(start, start + count) % num_classes
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if start + count > len(labels):
        raise ValueError(f"class_labels holds {len(labels)} labels for {start + count} samples.")
    return labels[start:start + count]


def generate_features(pipe, extractor: M.FeatureExtractor, n: int, sampler: str, num_steps: int, seed: int,
                      batch_size: int, guidance_scale: float = 1.0, class_labels="uniform", start: int = 0,
                      judge=None, progress: bool = True, **sampler_options) -> dict:
    """Sample n images in batches and return {"features", "labels", "judge_correct", "model_images"}.

    Batch i starts at sample start + i * batch_size and uses a generator seeded from (seed, that
    index), so a given split of the work always draws the same images.
    """
    feats, labels_out, judge_correct = [], [], 0
    counter = _CallCounter(getattr(pipe, "model", None))
    bar = progress_bar(total=n, show=progress, desc=f"eval {sampler}", unit="img", dynamic_ncols=True)
    try:
        for first in range(start, start + n, batch_size):
            b = min(batch_size, start + n - first)
            # a CPU generator: Pipeline.sample draws the starting noise on the CPU whatever the device
            g = torch.Generator().manual_seed(derive_seed(seed, "eval", first))
            y = _labels(pipe, class_labels, first, b)
            cond = {} if y is None else {"class_labels": y}
            x = pipe.sample(b, sampler=sampler, num_steps=num_steps, generator=g, guidance_scale=guidance_scale,
                            batch_size=b, progress=False, **cond, **sampler_options)
            x = x.float().clamp(-1, 1)
            feats.append(np.asarray(extractor(x), dtype=np.float64))
            if y is not None:
                labels_out.append(y)
                if judge is not None:
                    judge_correct += round(judge_accuracy(judge, x, y) * b)
            bar.update(b)
    finally:
        bar.close()
        counter.close()
    return {"features": np.concatenate(feats) if feats else np.zeros((0, 0)),
            "labels": torch.cat(labels_out) if labels_out else None,
            "judge_correct": judge_correct, "model_images": counter.images}


@torch.no_grad()
def judge_accuracy(classifier: torch.nn.Module, images: torch.Tensor, labels, batch_size: int = 500) -> float:
    """Share of images (N, C, H, W) in [-1, 1] that the judge assigns to their requested class labels (N,)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels; give one requested class per image.")
    if len(images) == 0:
        raise ValueError("judge_accuracy got no images.")
    param = next(classifier.parameters(), None)
    was_training = classifier.training
    classifier.eval()
    try:
        predicted = torch.cat([
            classifier(x.to(param.device, param.dtype) if param is not None else x).argmax(1).cpu()
            for x in images.split(batch_size)])
    finally:
        classifier.train(was_training)
    return float((predicted == labels).double().mean())


# ---------------------------------------------------------------------------------------------
# the evaluation


def evaluate_run(pipe, ref: DataConfig, n: int, *, sampler: str = "dpmpp_2m", num_steps: int = 20,
                 features: str | M.FeatureExtractor = "raw", cache_dir: str | Path = ".cache/diffusekit",
                 seed: int = 0, batch_size: int = 250, guidance_scale: float = 1.0,
                 class_labels="uniform", progress: bool = True, device: str | torch.device | None = None,
                 **sampler_options) -> dict:
    """Generate n samples with pipe and score them against the reference data set `ref`.

    Returns {fd, kid_mean, kid_std, precision, recall, sampler, steps, nfe, wall_time_s, n, features,
    ref_count, ...}; nfe is network evaluations per sample (counted with a hook on pipe.model when
    it is an nn.Module, else sampler.nfe(steps), doubled for classifier-free guidance), and
    judge_accuracy is added when the features come from a classifier and classes were requested.
    class_labels: "uniform" (balanced classes for a class-conditional model), None (unconditional)
    or a tensor of n labels.
    """
    if n < 2:
        raise ValueError(f"n={n}; need at least 2 samples to estimate a covariance (use thousands for FD).")
    rank, world = _rank_world()
    device = device if device is not None else getattr(pipe, "device", "cpu")
    extractor = feature_extractor(features, device) if isinstance(features, str) else features
    judge = extractor.model if isinstance(extractor, M.ClassifierFeatures) else None
    judge_size = getattr(getattr(judge, "config", None), "image_size", None)
    image_shape = getattr(pipe, "image_shape", None)
    if judge_size is not None and image_shape is not None and judge_size != image_shape[-1]:
        raise ValueError(f"the classifier in features={features!r} was trained on {judge_size}x{judge_size} "
                         f"images but the run makes {image_shape[-1]}x{image_shape[-1]}; train the judge with "
                         f"--image-size {image_shape[-1]} (or on the run's data).")
    start, count = _share(n, rank, world, batch_size)
    t0 = time.time()
    # the run's seed on every rank: a batch's generator depends only on its place in the grid
    local = generate_features(pipe, extractor, count, sampler, num_steps, seed, batch_size, guidance_scale,
                              class_labels, start=start, judge=judge, progress=progress and rank == 0,
                              **sampler_options)
    wall = time.time() - t0
    if world > 1:
        local = _gather({**local, "wall_time_s": wall})
        if rank != 0:
            return {"rank": rank, "n_local": count}
        wall = local["wall_time_s"]
    fake = local["features"]
    ref_stats = reference_statistics(ref, extractor, cache_dir, batch_size=max(batch_size, 256))
    result = M.evaluate(fake, ref_stats, seed=seed)
    nfe, nfe_source = _nfe(pipe, sampler, num_steps, guidance_scale, local, n, sampler_options)
    result.update({"sampler": sampler, "steps": num_steps, "nfe": nfe, "nfe_source": nfe_source,
                   "wall_time_s": wall, "n": n, "features": extractor.name, "ref_count": ref_stats.count,
                   "guidance_scale": guidance_scale, "seed": seed, "world_size": world})
    if judge is not None and local["labels"] is not None:
        result["judge_accuracy"] = local["judge_correct"] / n
    return result


def _nfe(pipe, sampler, num_steps, guidance_scale, local, n, options) -> tuple[float, str]:
    if local["model_images"]:
        # images through the network / samples: CFG's batched cond+uncond pass counts twice
        nfe = local["model_images"] / n
        return (int(nfe) if nfe == int(nfe) else nfe), "counted"
    plain = {k: v for k, v in options.items() if k != "timesteps"}          # tuned call times count as given
    nfe = pipe.sampler_for(sampler, **plain).nfe(num_steps, options.get("timesteps"))
    if guidance_scale != 1.0 and local["labels"] is not None:
        nfe *= 2
    return nfe, "sampler.nfe"


def _gather(local: dict) -> dict:
    """All ranks' features, labels and counts concatenated in rank order (torch.distributed).

    Joins the torchrun process group if nobody has yet (gloo: the payload is CPU numpy/tensors) and
    keeps it until the process exits: torch names a re-created default group as it named the first,
    so a second init_process_group in the same torchrun job can meet the old group's keys in the
    job's store and hang (a second evaluate_run did).
    """
    import atexit

    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    labels = [p["labels"] for p in parts if p["labels"] is not None]
    # a rank with no whole batch to generate (n < world * batch_size) contributes no rows
    return {"features": np.concatenate([p["features"] for p in parts if len(p["features"])]),
            "labels": torch.cat(labels) if labels else None,
            "judge_correct": sum(p["judge_correct"] for p in parts),
            "model_images": sum(p["model_images"] for p in parts),
            "wall_time_s": max(p["wall_time_s"] for p in parts)}
