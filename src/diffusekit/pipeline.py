"""Pipeline: a trained run (EMA weights + schedule) ready to sample, edit, invert and inpaint."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from . import editing
from .config import ConfigError
from .guidance import ClassifierFreeGuidance
from .samplers import Sampler, get_sampler
from .schedule import NoiseSchedule

# The spacing each sampler family does best with at few steps (Lin et al. 2023 recommend "trailing";
# Karras-style samplers with "linspace" reach t = 0).
DEFAULT_SPACING = "trailing"


class Pipeline:
    """A denoising network with its noise schedule and run config; the high-level entry point."""

    def __init__(self, model: torch.nn.Module, schedule: NoiseSchedule, config, class_names=(),
                 device: str | torch.device = "cpu", precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision={precision!r}; choose 'fp32' or 'bf16' (bf16 autocast of the network).")
        self.model, self.schedule, self.config = model.eval(), schedule, config
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.precision = precision

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
             precision: str = "fp32") -> "Pipeline":
        """Load runs/NAME: EMA weights (or "raw"), schedule and config, checked against each other."""
        from .train import load_run
        cfg, model, extra = load_run(run_dir, device=device, weights=weights)
        return cls(model, NoiseSchedule.from_config(cfg.schedule), cfg, extra.get("class_names") or (),
                   device=device, precision=precision)

    # --- properties of the trained model ------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.config.train.prediction_type

    @property
    def num_classes(self) -> int:
        return int(getattr(self.config.model, "num_classes", 0) or 0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.in_channels, m.image_size, m.image_size)

    def sampler_for(self, name: str = "dpmpp_2m", timestep_spacing: str | None = None, **options) -> Sampler:
        """A sampler from the registry bound to this model's schedule and prediction type."""
        return get_sampler(name, self.schedule, prediction_type=self.prediction_type,
                           timestep_spacing=timestep_spacing or DEFAULT_SPACING, **options)

    def network(self, guidance_scale: float = 1.0) -> Callable:
        """The model call the samplers use: precision handled here, and classifier-free guidance
        (eps_uncond + w (eps_cond - eps_uncond)) when guidance_scale != 1."""
        model, precision, device = self.model, self.precision, self.device

        def call(x, t, **cond):
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with ctx:
                return model(x, t, **cond).float()

        if guidance_scale != 1.0:
            if not self.num_classes:
                raise ConfigError(f"guidance_scale={guidance_scale} needs a class-conditional model; this run "
                                  "has num_classes=0. Use guidance_scale=1.")
            return ClassifierFreeGuidance(call, guidance_scale, null_label=-1)
        return call

    def class_labels(self, labels, n: int) -> torch.Tensor | None:
        """Labels as a (n,) long tensor: None, one int (or class name) for all, or one per image."""
        if labels is None:
            return None
        if not self.num_classes:
            raise ConfigError("class labels were given but this run is unconditional (num_classes=0); "
                              "drop --class, or train with labelled data.")
        if isinstance(labels, str):
            if labels not in self.class_names:
                raise ConfigError(f"class {labels!r} is not one of this run's classes {self.class_names}.")
            labels = self.class_names.index(labels)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise ConfigError(f"got {labels.numel()} class labels for {n} images; give one label or one per image.")
        bad = labels[(labels < -1) | (labels >= self.num_classes)]
        if len(bad):
            raise ConfigError(f"class label {int(bad[0])} is out of range; this run has classes 0..{self.num_classes - 1} "
                              "(-1 = unconditional).")
        return labels.to(self.device)

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, sampler: str = "dpmpp_2m", num_steps: int = 20,
               generator: torch.Generator | None = None, class_labels=None, guidance_scale: float = 1.0,
               batch_size: int = 256, progress: bool = False, callback=None, timestep_spacing: str | None = None,
               noise: torch.Tensor | None = None, **options) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1].

        All starting noise is drawn first, so image k starts from the same noise whatever the
        batch size; stochastic samplers draw their step noise per batch from the same generator.
        """
        if n < 1:
            raise ConfigError(f"n={n}; ask for at least one image.")
        s = self.sampler_for(sampler, timestep_spacing, **options)
        if noise is None:
            noise = torch.randn((n, *self.image_shape), generator=generator)
        labels = self.class_labels(class_labels, n)
        net = self.network(guidance_scale)
        outs = []
        batches = range(0, n, batch_size)
        if progress and len(batches) > 1:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"sampling {n} images", unit="batch")
        for start in batches:
            x = noise[start:start + batch_size].to(self.device)
            cond = {} if labels is None else {"class_labels": labels[start:start + batch_size]}
            out = s.sample(net, x, num_steps=num_steps, generator=generator, callback=callback,
                           progress=progress and n <= batch_size, **cond)
            outs.append(out.clamp(-1, 1).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def trajectory(self, n: int = 4, sampler: str = "dpmpp_2m", num_steps: int = 20, generator=None,
                   class_labels=None, guidance_scale: float = 1.0):
        """(final images, x_t per step, predicted x0 per step, timesteps) for a denoising picture."""
        xs, x0s, ts = [], [], []

        def record(info):
            xs.append(info.x.clamp(-1, 1).cpu())
            x0s.append(info.x0_pred.clamp(-1, 1).cpu())
            ts.append(info.t)
        out = self.sample(n, sampler, num_steps, generator, class_labels, guidance_scale, callback=record)
        return out, xs, x0s, ts

    # --- editing ------------------------------------------------------------------------------
    def _check_image(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 3:
            image = image[None]
        if tuple(image.shape[1:]) != self.image_shape:
            raise ConfigError(f"image of shape {tuple(image.shape[1:])} does not match the model's "
                              f"{self.image_shape}; load it with diffusekit.data.load_image(path, "
                              f"image_size={self.image_shape[1]}, channels={self.image_shape[0]}).")
        return image.to(self.device)

    @torch.no_grad()
    def edit(self, image: torch.Tensor, strength: float = 0.5, sampler: str = "dpmpp_2m", num_steps: int = 50,
             generator=None, class_labels=None, guidance_scale: float = 1.0, **options) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): noise the image to t = strength * T, then denoise it."""
        image = self._check_image(image)
        cond = self._cond(class_labels, len(image))
        out = editing.sdedit(self.sampler_for(sampler, **options), self.network(guidance_scale), image, strength,
                             num_steps, generator, **cond)
        return out.clamp(-1, 1).cpu()

    @torch.no_grad()
    def invert(self, image: torch.Tensor, num_steps: int = 50, refine_steps: int = 0, class_labels=None):
        """DDIM inversion: the x_T that deterministic DDIM maps back to the image."""
        image = self._check_image(image)
        cond = self._cond(class_labels, len(image))
        return editing.invert(self.network(), self.schedule, image, num_steps, self.prediction_type,
                              refine_steps=refine_steps, timestep_spacing=DEFAULT_SPACING, **cond)

    @torch.no_grad()
    def reconstruct(self, x_T: torch.Tensor, num_steps: int = 50, class_labels=None, guidance_scale: float = 1.0):
        """DDIM (eta = 0) from an inverted x_T, optionally under another class or guidance."""
        cond = self._cond(class_labels, len(x_T))
        return editing.reconstruct(self.network(guidance_scale), self.schedule, x_T.to(self.device), num_steps,
                                   self.prediction_type, timestep_spacing=DEFAULT_SPACING, **cond).cpu()

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, sampler: str = "ddim", num_steps: int = 50,
                generator=None, resample: int = 1, class_labels=None, guidance_scale: float = 1.0,
                **options) -> torch.Tensor:
        """Fill the region where mask == 1; pixels where mask == 0 stay exactly the input's."""
        image = self._check_image(image)
        cond = self._cond(class_labels, len(image))
        out = editing.inpaint(self.sampler_for(sampler, **options), self.network(guidance_scale), image,
                              mask.to(self.device), num_steps, generator, resample=resample, **cond)
        return out.cpu()

    def _cond(self, class_labels, n):
        labels = self.class_labels(class_labels, n)
        return {} if labels is None else {"class_labels": labels}
