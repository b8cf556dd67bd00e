"""The copy check of bench/finetune.py (bench/finetune_scores.py): it must call copies copies and new drawings new."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from finetune_scores import copy_scores, nearest_rmse  # noqa: E402


def _images(n, seed):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_nearest_rmse_is_the_distance_to_the_closest_instance():
    instance = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    images = torch.stack([torch.full((3, 8, 8), 0.25), torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.9)])
    assert torch.allclose(nearest_rmse(images, instance), torch.tensor([0.25, 0.5, 0.1]), atol=1e-6)


def test_copies_are_counted_and_new_drawings_are_not():
    instance = _images(4, 0)
    # the untaught renderings: the instance images changed by about 0.3 RMSE (another tone of the same emoji)
    others = instance + 0.3 * torch.randn(instance.shape, generator=torch.Generator().manual_seed(1))
    copies = instance.repeat(8, 1, 1, 1) + 0.05 * torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    fresh = _images(32, 3)                           # unrelated images: far from every taught one
    half = torch.cat([copies[:16], fresh[:16]])
    drawn = {"new-g1-n32": copies, "new-g2-n32": fresh, "new-g4-n32": half}
    out = copy_scores(drawn, instance, others, [1, 2, 4], 32)
    assert 0.25 < out["ref_rmse"] < 0.35
    assert out["1"]["copy_share"] == 1.0 and out["1"]["median_rmse"] < 0.1
    assert out["2"]["copy_share"] == 0.0 and out["2"]["median_rmse"] > 0.5
    assert out["4"]["copy_share"] == 0.5


def test_without_untaught_renderings_only_distances_are_given():
    instance = _images(2, 0)
    out = copy_scores({"new-g2-n4": instance.repeat(2, 1, 1, 1)}, instance, instance[:0], [2], 4)
    assert out["ref_rmse"] is None and out["2"]["copy_share"] is None and out["2"]["median_rmse"] < 1e-6
