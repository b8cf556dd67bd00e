"""What a fine-tuning step sees: the instance images (and the base's class images), their prompts, t and noise.

Instance images are read once at the base's size and channels (a latent base encodes them once) and
batched by `DataOrder` from (seed, epoch); every draw of step s (timesteps, noise) comes from
(seed, "batch", s), as in the diffusion trainer, so a resumed fine-tune equals an uninterrupted one.
With prior preservation each step's batch is B instance images followed by B class images, with
per-image loss factors 2 and 2 * prior_loss_weight: the batch mean is then instance loss +
prior_loss_weight * class loss (DreamBooth, Ruiz et al. 2023, eq. 2).

Class images: the base model draws `num_class_images` from `class_prompt` once (seeded), saved in
RUN/class_images/images.safetensors with images.json saying what made them; a resume (or a rerun with
the same settings) reads them back instead of drawing again.

Under torchrun `batch_size` is the GLOBAL batch, as in the diffusion trainer: the step's instance (and
class) indices, timesteps and noise are drawn for all of it from (seed, ...), laid out as one process
lays them out (B instance rows, then B class rows), and each rank takes its rows (Dist.rows): rank r the
instance rows r*b..(r+1)*b-1 and the class rows B+r*b..B+(r+1)*b-1, b = B / world_size. Dropout masks
follow the global row. So every rank trains on different examples and k processes train what one
process trains at the same batch size, up to float reduction order. The class images are read or drawn
by rank 0 alone, which saves them; the other ranks receive them from it (Dist.broadcast).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusekit.config import ConfigError
from diffusekit.data import DataConfig, DataOrder, load_dataset
from diffusekit.nn.layers import row_dropout_seeds
from diffusekit.seeding import derive_seed
from diffusekit.store import read_weights, write_text_atomic, write_weights_atomic
from diffusekit.store.finetune_config import CLASS_IMAGES, FinetuneConfig
from diffusekit.training.losses import draw_t_noise
from diffusekit.training.processes import Dist


def instance_images(cfg: FinetuneConfig, pipe) -> tuple[torch.Tensor, list[str] | None]:
    """(images (N, C, H, W) in [-1, 1] at the base's pixel shape, their prompts or None for a model without text).
    Transparent pixels become the base's own background (a base trained with --background white learns white)."""
    channels, size, _ = pipe.image_shape
    data = load_dataset(DataConfig(source=cfg.data, kind="folder", image_size=size, channels=channels,
                                   class_labels=False, alpha_background=base_background(pipe)))
    if len(data) < 2:
        raise ConfigError(f"{cfg.data} holds {len(data)} image; a fine-tune needs at least 2 images of what it "
                          "learns (DreamBooth uses 3-5).")
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"{cfg.data} holds {len(data)} images, fewer than batch_size={cfg.train.batch_size}; "
                          f"set --batch-size {len(data)} or lower.")
    if not pipe.has_text:
        return data.images, None
    if cfg.instance_prompt:
        return data.images, [cfg.instance_prompt] * len(data)
    if getattr(data, "captions", None) is None:
        raise ConfigError(f"the base is a text-to-image model and {cfg.data} has no captions; give "
                          "--instance-prompt \"a sks emoji\" (or captions: metadata.jsonl or .txt files).")
    return data.images, list(data.captions)


def base_background(pipe) -> str:
    """What the base's training images had under their transparent pixels (a diffusers folder: black)."""
    return getattr(getattr(pipe.config, "data", None), "alpha_background", None) or "black"


def class_images(cfg: FinetuneConfig, pipe, run_dir: Path, base_sha256: str, generate=None,
                 dist: Dist | None = None) -> torch.Tensor:
    """The base's class images (N, C, H, W) in [-1, 1]: read from RUN/class_images when they were drawn with
    these settings from this base, else drawn by `generate(cfg, pipe)` (default draw_class_images; pipe must be
    the base, untrained) and saved there. Under torchrun rank 0 alone reads or draws and saves them, and
    sends them to the other ranks (they wait for it, and need not see the run folder)."""
    dist = dist or Dist()
    images = _cached_or_drawn(cfg, pipe, run_dir, base_sha256, generate) if dist.rank == 0 else None
    return dist.broadcast(images, pipe.device)


def _cached_or_drawn(cfg: FinetuneConfig, pipe, run_dir: Path, base_sha256: str, generate) -> torch.Tensor:
    folder = Path(run_dir) / CLASS_IMAGES
    made_by = {"class_prompt": cfg.class_prompt, "num_class_images": cfg.num_class_images, "seed": cfg.train.seed,
               "sampler": cfg.train.sample_sampler, "steps": cfg.train.sample_steps,
               "base_sha256": base_sha256}
    record, weights = folder / "images.json", folder / "images.safetensors"
    if record.is_file() and weights.is_file() and json.loads(record.read_text()) == made_by:
        return read_weights(weights)[0]["images"]
    images = (generate or draw_class_images)(cfg, pipe)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights_atomic(weights, {"images": images.contiguous()}, {"format": "pt"})
    write_text_atomic(record, json.dumps(made_by, indent=1) + "\n")
    from diffusekit.viz import save_grid
    save_grid(images[:64], folder / "class_images.png")
    return images


@torch.no_grad()
def draw_class_images(cfg: FinetuneConfig, pipe) -> torch.Tensor:
    """num_class_images from the base at class_prompt, seeded by (seed, "class-images"); on the CPU."""
    g = torch.Generator(pipe.device).manual_seed(derive_seed(cfg.train.seed, "class-images"))
    prompt = cfg.class_prompt if pipe.has_text else None
    labels = -1 if pipe.num_classes else None                # a class-conditional base: its unconditional branch
    return pipe.sample(cfg.num_class_images, cfg.train.sample_sampler, cfg.train.sample_steps, generator=g,
                       prompt=prompt, class_labels=labels).float().cpu()


class FinetuneInputs:
    """step -> (x0, t, noise, cond, sample_weights): B instance images (then B class images with prior preservation)."""

    def __init__(self, cfg: FinetuneConfig, pipe, images: torch.Tensor, prompts: list[str] | None,
                 classes: torch.Tensor | None, device: torch.device, dist: Dist | None = None):
        tc, dist = cfg.train, dist or Dist()
        self.cfg, self.schedule, self.device, self.batch = cfg, pipe.schedule, device, tc.batch_size
        with torch.no_grad():
            self.x0 = _encoded(pipe, images, device)
            self.class_x0 = _encoded(pipe, classes, device) if classes is not None else None
        self.prompts = prompts
        self.class_prompt = cfg.class_prompt if prompts is not None else None
        self.order = DataOrder(len(self.x0), tc.batch_size, tc.seed)
        self.class_order = DataOrder(len(self.class_x0), tc.batch_size, derive_seed(tc.seed, "class-order")) \
            if self.class_x0 is not None else None
        self.null_label = pipe.num_classes > 0          # a class-conditional base learns under the null label
        self.batches_per_epoch = self.order.batches_per_epoch
        # this rank's rows: of the global instance batch, and their global places (class rows after all B instance rows)
        self.rows = dist.rows(tc.batch_size)
        mine = list(range(self.rows.start, self.rows.stop))
        self.global_rows = mine + ([tc.batch_size + i for i in mine] if self.class_order is not None else [])

    def __call__(self, step: int):
        idx = self.order.batch(step)[self.rows]
        x0, prompts = self.x0[idx], [self.prompts[i] for i in idx] if self.prompts is not None else None
        weights = torch.ones(len(idx), device=self.device)
        if self.class_order is not None:
            x0 = torch.cat([x0, self.class_x0[self.class_order.batch(step)[self.rows]]])
            prompts = prompts + [self.class_prompt] * len(idx) if prompts is not None else None
            weights = torch.cat([weights, torch.full_like(weights, self.cfg.prior_loss_weight)]) * 2
        # t and noise for the global batch from (seed, step), then this rank's rows
        g = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.train.seed, "batch", step))
        rows = self.batch * (2 if self.class_order is not None else 1)
        t, noise = draw_t_noise(self.schedule, (rows, *x0.shape[1:]), g, self.device, x0.dtype)
        take = torch.tensor(self.global_rows, device=t.device)
        t, noise = t[take], noise[take]
        cond = {} if prompts is None else {"prompts": prompts}
        if self.null_label:
            cond["class_labels"] = torch.full((len(x0),), -1, dtype=torch.long, device=self.device)
        return x0, t, noise, cond, weights

    def dropout_masks(self, step: int, sl: slice):
        """Dropout masks by global row, from (seed, step, layer, row): as in the diffusion trainer."""
        return row_dropout_seeds(derive_seed(self.cfg.train.seed, "dropout", step), self.global_rows[sl])


def _encoded(pipe, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the model denoises: the images, or a latent base's scaled latents (encoded once)."""
    images = images.to(device)
    return pipe.encode(images).float() if pipe.autoencoder is not None else images
