"""Streaming from disk: the same items and, step by step, the same batches as the in-memory path."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.data import BatchSource, DataConfig, StreamingImageFolder, load_dataset, open_dataset
from diffusekit.data import DataOrder

N, BATCH, SEED = 30, 6, 11   # 5 batches per epoch: steps 0..11 cross two epoch boundaries


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """N random RGB images in two class folders, of mixed (some non-square) sizes, with captions."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for i in range(N):
        h, w = [(10, 10), (10, 14), (12, 9)][i % 3]
        path = root / ("ab"[i % 2]) / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(f"image {i}")
    return root


def _cfg(folder, **kw):
    return DataConfig(source=str(folder), **{"image_size": 8, "crop": "random", "hflip": True, **kw})


def _assert_same(a, b):
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels) and a.captions == b.captions


def test_streaming_items_equal_in_memory(folder):
    cfg = _cfg(folder)
    memory, stream = load_dataset(cfg), open_dataset(cfg, streaming=True)
    assert isinstance(stream, StreamingImageFolder) and len(stream) == len(memory) == N
    assert (stream.channels, stream.image_size, stream.num_classes) == (3, 8, 2)
    assert torch.equal(stream.labels, memory.labels) and stream.captions == memory.captions
    assert stream.config == memory.config and stream.config.channels == 3
    for i in range(0, N, 4):
        image, label = stream[i]
        torch.testing.assert_close(image, memory.images[i], rtol=0, atol=0)
        assert label == memory.labels[i]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_equal_in_memory_and_streamed(folder, num_workers):
    cfg = _cfg(folder)
    memory = BatchSource(load_dataset(cfg), BATCH, SEED)
    with BatchSource(open_dataset(cfg, streaming=True), BATCH, SEED, num_workers=num_workers) as stream:
        order = DataOrder(N, BATCH, SEED)
        for step in range(12):
            a, b = memory.batch(step), stream.batch(step)
            _assert_same(a, b)
            assert a.images.shape == (BATCH, 3, 8, 8) and a.images.abs().max() <= 1
            # which images: the trainer's data order, labels and captions travel with them
            idx = order.batch(step)
            assert a.labels.tolist() == memory.dataset.labels[idx].tolist()
            assert a.captions == [memory.dataset.captions[i] for i in idx.tolist()]


def test_resume_and_ranks_give_the_same_batches(folder):
    cfg = _cfg(folder)
    dataset = open_dataset(cfg, streaming=True)
    with BatchSource(dataset, BATCH, SEED) as whole:
        expected = [whole.batch(step) for step in range(9)]
    # a resumed run asks for step 7 first: the loader restarts there
    with BatchSource(dataset, BATCH, SEED) as resumed:
        for step in (7, 8, 3):
            _assert_same(resumed.batch(step), expected[step])
    # two ranks hold the two halves of each global batch
    halves = [BatchSource(dataset, BATCH, SEED, rank=r, world_size=2) for r in range(2)]
    for step in (0, 6):
        parts = [h.batch(step) for h in halves]
        assert parts[0].images.shape[0] == BATCH // 2
        torch.testing.assert_close(torch.cat([p.images for p in parts]), expected[step].images, rtol=0, atol=0)
        assert parts[0].captions + parts[1].captions == expected[step].captions


def test_augmentation_draws(folder):
    cfg = _cfg(folder)
    memory = load_dataset(cfg)
    source = BatchSource(memory, BATCH, SEED)
    order = DataOrder(N, BATCH, SEED)
    flipped = cropped_off_centre = 0
    for step in range(10):
        batch, idx = source.batch(step), order.batch(step).tolist()
        for k, i in enumerate(idx):
            x, centre = batch.images[k], memory.images[i]
            flipped += torch.equal(x, centre.flip(-1)) and not torch.equal(x, centre)
            cropped_off_centre += not (torch.equal(x, centre) or torch.equal(x, centre.flip(-1)))
    assert flipped > 0 and cropped_off_centre > 0
    # without augmentation a batch is exactly the stored images of the data order
    plain = load_dataset(_cfg(folder, crop="center", hflip=False))
    batch = BatchSource(plain, BATCH, SEED).batch(3)
    torch.testing.assert_close(batch.images, plain.images[order.batch(3)], rtol=0, atol=0)


def test_unlabelled_uncaptioned_and_errors(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    stream = open_dataset(DataConfig(source=str(tmp_path)), streaming=True)
    batch = BatchSource(stream, 2, 0).batch(0)
    assert batch.images.shape == (2, 1, 6, 6) and batch.labels is None and batch.captions is None
    with pytest.raises(ValueError, match="fewer than batch_size=5"):
        BatchSource(stream, 5, 0)
    with pytest.raises(ValueError, match="multiple of 3"):
        BatchSource(stream, 2, 0, world_size=3)
    with pytest.raises(ValueError, match="rank=2"):
        BatchSource(stream, 2, 0, rank=2, world_size=2)
    # a file broken after indexing stops the run with its name
    (tmp_path / "2.png").write_bytes((tmp_path / "2.png").read_bytes()[:40])
    with pytest.raises(RuntimeError, match=r"2\.png"):
        for i in range(4):
            stream[i]
