"""bench/mnist_judge.py on a tiny IDX folder (8x8 images): `relevel` gives the judge `train-classifier`
trains with the levels view, and the typical / probe sets are what they say."""
import sys

import numpy as np
import pytest
import torch

from idx_files import write_idx
from repo_paths import REPO

sys.path.insert(0, str(REPO / "bench"))
import mnist_judge as mj  # noqa: E402

from diffusekit.data import DataConfig, load_dataset  # noqa: E402
from diffusekit.store.classifier import ClassifierTrainConfig, default_classifier_config, load_classifier  # noqa: E402
from diffusekit.training.classifier import train_classifier  # noqa: E402


def _idx_folder(root):
    """Three classes of 8x8 images: a bright row, column or square, with noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("t10k", 12)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, (n, 8, 8))
        for img, y in zip(images, labels):
            img[[2, 3] if y == 0 else slice(None), [2, 3] if y == 1 else slice(None)] += 190 if y < 2 else 0
            if y == 2:
                img[2:6, 2:6] += 190
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.mark.slow
def test_relevel_gives_the_judge_train_classifier_trains_with_the_levels_view(tmp_path):
    (tmp_path / "data").mkdir()
    data = _idx_folder(tmp_path / "data")
    tc = ClassifierTrainConfig(steps=4, batch_size=16, device="cpu", precision="fp32")
    cfg = {"base_channels": 4, "groups": 2}
    for view in ("pooled", "levels"):
        train_classifier(DataConfig(source=str(data)), tmp_path / view,
                         default_classifier_config(8, 1, 3, features=view, **cfg), tc, progress=False)
    metrics = mj.relevel(tmp_path / "pooled", data, tmp_path / "relevelled")
    assert metrics["features"] == "levels" and metrics["relevelled_from"] == str(tmp_path / "pooled")
    trained, trained_cfg = load_classifier(tmp_path / "levels")
    relevelled, relevelled_cfg = load_classifier(tmp_path / "relevelled")
    assert relevelled_cfg.classifier == trained_cfg.classifier
    a, b = trained.state_dict(), relevelled.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)      # the view changes no training
    images = load_dataset(DataConfig(source=str(data), split="train")).images
    torch.testing.assert_close(mj.levels_scale(trained, images), trained.feature_scale)  # the bench's own recount


def test_typical_draws_from_the_tenth_nearest_each_class_mean():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    images = torch.randn(200, 1, 4, 4, generator=g)
    picks = mj.typical(images, labels, 5, torch.Generator().manual_seed(1))
    assert len(picks) == 50 and torch.equal(labels[picks], torch.arange(10).repeat_interleave(5))
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        d = (images[idx] - images[idx].mean(0)).flatten(1).pow(2).sum(1)
        nearest = set(idx[d.argsort()[:2]].tolist())                 # a tenth of 20 images
        assert set(picks[labels[picks] == k].tolist()) <= nearest


def test_probe_sets_change_what_they_name():
    real = torch.full((3, 1, 4, 4), -1.0)
    real[:, :, 1:3, 1:3] = 0.5
    sets = mj.probe_sets(real)
    assert torch.equal(sets["background_0.05"][:, :, 0, 0], torch.full((3, 1), -0.95))
    assert torch.equal(sets["background_0.05"][:, :, 1:3, 1:3], real[:, :, 1:3, 1:3])
    assert len(torch.unique(sets["grey_levels_16"])) <= 16
    for s in (0.02, 0.05, 0.1):
        inside = sets[f"noise_{s:g}"][:, :, 1:3, 1:3] - 0.5                 # not clamped there
        assert 0.2 * s < inside.std().item() < 3 * s
