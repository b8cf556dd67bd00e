"""Gradient accumulation: K micro-batches of B / K images train what one batch of B images trains.

The trainer draws t, noise and label dropout for the whole global batch from (seed, step), splits
it into K micro-batches, divides each micro-batch's mean loss by K and steps once, so the summed
gradient is the gradient of the mean loss over B: only the float32 summation order differs
(tolerances: test_multinode.assert_same_training). With several processes each rank
accumulates its own slice and DDP all-reduces once, on the last micro-batch (no_sync before it).
"""
import dataclasses
import sys

import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.nn.layers import RowDropout, row_dropout_seeds
from diffusekit.store.run_config import TrainConfig
from diffusekit.training import train
from test_multinode import assert_same_training, entry_point, launch, loopback_env, tiny_distributed_run

STEPS = 6


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accum_equals_the_big_batch(tmp_path, k):
    # class-conditional with label dropout: the labels and dropout draws are sliced with the images
    big = tiny_distributed_run(steps=STEPS, batch_size=32, grad_accum=1, class_dropout=0.3)
    accumulated = tiny_distributed_run(steps=STEPS, batch_size=32, grad_accum=k, class_dropout=0.3)
    train(big, tmp_path / "big", progress=False)
    train(accumulated, tmp_path / "accum", progress=False)
    assert_same_training(tmp_path / "big", tmp_path / "accum", big)


def test_grad_accum_is_not_a_smaller_batch(tmp_path):
    # the comparison can fail: batch 8 in one piece is not batch 32 in four pieces of 8
    cfg = tiny_distributed_run(steps=STEPS, batch_size=32, grad_accum=4)
    small = tiny_distributed_run(steps=STEPS, batch_size=8, grad_accum=1)
    train(cfg, tmp_path / "accum", progress=False)
    train(small, tmp_path / "small", progress=False)
    with pytest.raises(AssertionError):
        assert_same_training(tmp_path / "accum", tmp_path / "small", cfg)


def test_grad_accum_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum=0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ConfigError, match="batch_size=30 must split into grad_accum=4"):
        TrainConfig(batch_size=32 - 2, grad_accum=4)


def with_dropout(cfg, p: float = 0.3):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=p))


def test_grad_accum_equals_the_big_batch_with_model_dropout(tmp_path):
    # the UNet's dropout masks are drawn per global row, so micro-batches draw the big batch's masks
    # (planted in a scratch copy: RowDropout falling back to nn.Dropout's random stream fails this test)
    big = with_dropout(tiny_distributed_run(steps=STEPS, batch_size=32, grad_accum=1))
    accumulated = with_dropout(tiny_distributed_run(steps=STEPS, batch_size=32, grad_accum=4))
    no_dropout = tiny_distributed_run(steps=STEPS, batch_size=32, grad_accum=1)
    for name, cfg in [("big", big), ("accum", accumulated), ("plain", no_dropout)]:
        train(cfg, tmp_path / name, progress=False)
    assert_same_training(tmp_path / "big", tmp_path / "accum", big)
    with pytest.raises(AssertionError):             # the masks are really applied: it is not the plain run
        assert_same_training(tmp_path / "big", tmp_path / "plain", big)


def test_row_dropout_masks_depend_on_the_global_row_only():
    layer = RowDropout(0.25).train()
    x = torch.ones(4, 3, 8, 8)
    with row_dropout_seeds(7, range(4)):
        whole = layer(x)
    with row_dropout_seeds(7, range(2, 4)):
        tail = layer(x[2:])
    assert torch.equal(whole[2:], tail)                                    # rows 2-3 alone: same masks
    assert torch.allclose(whole.unique(), torch.tensor([0.0, 1 / 0.75]))   # inverted dropout
    assert abs((whole == 0).float().mean().item() - 0.25) < 0.06           # 768 draws, sd 0.016
    assert not torch.equal(whole[0], whole[1])                             # each row its own mask
    with row_dropout_seeds(8, range(4)):
        assert not torch.equal(layer(x), whole)                            # the step's seed matters
    with row_dropout_seeds(7, range(4)):                                   # each call is a new layer
        first, second = layer(x), layer(x)
    assert torch.equal(first, whole) and not torch.equal(first, second)
    assert torch.equal(layer.eval()(x), x)                                  # evaluation: identity
    with pytest.raises(ValueError, match="2 row indices for a batch of 4"):
        with row_dropout_seeds(7, range(2)):
            layer.train()(x)


@pytest.mark.slow
def test_grad_accum_with_two_processes_equals_one_process(tmp_path):
    # 2 ranks x 2 micro-batches of 8 = one process with one batch of 32; exercises DDP's no_sync, and
    # the UNet's dropout (masks by global row) is the same on every split
    one = with_dropout(tiny_distributed_run(steps=4, batch_size=32, grad_accum=1))
    two = with_dropout(tiny_distributed_run(steps=4, batch_size=32, grad_accum=2))
    config = tmp_path / "run.json"
    two.to_json(config)
    train(one, tmp_path / "single", progress=False)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max_restarts", "0"]
    launch([torchrun + entry_point(config, tmp_path / "ddp")], loopback_env(tmp_path))
    assert_same_training(tmp_path / "single", tmp_path / "ddp", one)


def test_grad_accum_equals_the_big_batch_with_captions(tmp_path):
    # a learned text encoder trained with the UNet; caption dropout is drawn for the global batch too
    from diffusekit.store.run_config import RunConfig
    from diffusekit.training.resolve import resolve_run_config
    from test_text_to_image import text_options
    big, data = resolve_run_config(text_options(**{"train.steps": 4, "train.log_every": 1, "train.sample_every": 0,
                                                   "train.caption_dropout": 0.3, "train.precision": "fp32"}))
    accumulated = RunConfig.from_dict({**big.to_dict(), "train": {**big.train.to_dict(), "grad_accum": 2}})
    train(big, tmp_path / "big", dataset=data, progress=False)
    train(accumulated, tmp_path / "accum", dataset=data, progress=False)
    assert_same_training(tmp_path / "big", tmp_path / "accum", big)
