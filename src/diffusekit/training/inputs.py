"""What one diffusion training step sees: x0 (pixels or latents), t, noise and the conditioning.

Every random draw of a step (timesteps, noise, label and caption dropout) is made for the whole
GLOBAL batch from a generator seeded by (seed, step), and each torchrun rank takes its slice; the
model's dropout masks are drawn per global row from (seed, step, layer, row) (`dropout_masks`). So
one process at batch B and k processes at batch B see the same numbers, and gradient
accumulation (micro-batches of one rank's slice) sees them too: results depend on the global batch
alone, up to floating-point reduction order. Images come from data.BatchSource (in memory or
streamed); a latent run encodes them with its frozen autoencoder, once for in-memory data
(cached in RUN/latents-KEY.safetensors) or batch by batch for streamed folders.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from diffusekit.data.batches import BatchSource
from diffusekit.nn.layers import row_dropout_seeds
from diffusekit.progress import bar as progress_bar
from diffusekit.seeding import derive_seed
from diffusekit.store import write_weights_atomic
from diffusekit.training.losses import draw_t_noise
from diffusekit.training.processes import Dist


class StepInputs:
    """step -> (x0, t, noise, cond) for this rank's share of the global batch."""

    def __init__(self, cfg, dataset, schedule, dist: Dist, device: torch.device, autoencoder=None,
                 ae_fingerprint: str = "", run_dir: Path | None = None, progress: bool = False):
        tc = cfg.train
        self.cfg, self.dataset, self.schedule, self.dist, self.device = cfg, dataset, schedule, dist, device
        self.source = BatchSource(dataset, tc.batch_size, tc.seed, rank=dist.rank, world_size=dist.world_size,
                                  num_workers=tc.num_workers, device=device, pin_memory=device.type == "cuda")
        self.autoencoder, self.latents = autoencoder, None
        augmented = getattr(dataset, "hflip", False) or getattr(dataset, "crop", "center") == "random"
        if autoencoder is not None and hasattr(dataset, "images") and not augmented:
            self.latents = cached_latents(autoencoder, ae_fingerprint, dataset.images, run_dir, device, progress)
        self.rows = dist.rows(tc.batch_size)      # this rank's rows of the global batch

    @property
    def batches_per_epoch(self) -> int:
        return self.source.batches_per_epoch

    def _images(self, step: int):
        if self.latents is not None:
            indices, _ = self.source.items(step)
            d = self.dataset
            labels = d.labels[indices].to(self.device) if d.labels is not None else None
            captions = [d.captions[i] for i in indices] if d.captions is not None else None
            return self.latents[indices].to(self.device), labels, captions
        images, labels, captions = self.source.batch(step)
        if self.autoencoder is not None:
            with torch.no_grad():
                images = self.autoencoder.encode(images)
        return images, labels, captions

    def __call__(self, step: int):
        tc = self.cfg.train
        x0, labels, captions = self._images(step)
        # all draws for the global batch from (seed, step), then this rank's slice
        g = torch.Generator(self.device).manual_seed(derive_seed(tc.seed, "batch", step))
        t, noise = draw_t_noise(self.schedule, (tc.batch_size, *x0.shape[1:]), g, self.device, x0.dtype)
        drop = torch.rand(tc.batch_size, generator=g, device=g.device).to(self.device)
        t, noise, drop = (v[self.rows] for v in (t, noise, drop))
        cond = {}
        if labels is not None and self.cfg.model.num_classes:
            # label -> the null class with prob. class_dropout (classifier-free guidance, Ho & Salimans 2022)
            cond["class_labels"] = torch.where(drop < tc.class_dropout, torch.full_like(labels, -1), labels)
        if captions is not None and self.cfg.text is not None:
            # caption -> the empty prompt with prob. caption_dropout (the text model's unconditional branch)
            cond["prompts"] = ["" if float(d) < tc.caption_dropout else c for d, c in zip(drop, captions)]
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0, t, noise, cond

    def dropout_masks(self, step: int, sl: slice):
        """The block in which the model's dropout layers draw masks by global row: rows sl of this rank's slice.

        With masks a function of (seed, step, layer, global row), dropout too is the same for one process,
        k ranks and K micro-batches (nn.layers.row_dropout_seeds).
        """
        lo = self.rows.start
        return row_dropout_seeds(derive_seed(self.cfg.train.seed, "dropout", step), range(lo + sl.start, lo + sl.stop))

    def close(self) -> None:
        self.source.close()


def micro_batches(n: int, k: int) -> list[slice]:
    """k equal slices of n items (gradient accumulation)."""
    size = n // k
    return [slice(i * size, (i + 1) * size) for i in range(k)]


def slice_cond(cond: dict, sl: slice) -> dict:
    """The conditioning of a micro-batch: tensors and prompt lists sliced alike."""
    return {k: v[sl] for k, v in cond.items()}


# --- latents: the training images encoded once, cached beside the run ------------------------------


def data_fingerprint(images: torch.Tensor) -> str:
    """A short hash of a tensor's bytes, to key caches."""
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def encode_all(autoencoder, images: torch.Tensor, device: torch.device, batch_size: int = 256,
               progress: bool = False) -> torch.Tensor:
    """Scaled latents (N, c, h, w) of images (N, C, H, W) in [-1, 1] (the posterior mode), on the CPU."""
    out = []
    chunks = images.split(batch_size)
    for x in progress_bar(chunks, desc="encoding latents", show=progress and len(chunks) > 1, leave=False):
        out.append(autoencoder.encode(x.to(device)).float().cpu())
    return torch.cat(out)


def cached_latents(autoencoder, ae_fingerprint: str, images: torch.Tensor, cache_dir: Path,
                   device: torch.device, progress: bool = False) -> torch.Tensor:
    """encode_all, cached in cache_dir/latents-KEY.safetensors; the key changes with the data or the autoencoder."""
    from safetensors.torch import load_file

    key = hashlib.sha256(f"{data_fingerprint(images)}-{ae_fingerprint}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if path.exists():
        return load_file(str(path))["latents"]
    latents = encode_all(autoencoder, images, device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("latents-*.safetensors"):
        old.unlink()                         # a cache of other data or another autoencoder is stale
    write_weights_atomic(path, {"latents": latents}, {"data": data_fingerprint(images), "autoencoder": ae_fingerprint})
    return latents
