"""Pipeline: a trained network with its noise schedule, ready to sample, edit, invert and inpaint.

Guidance is composed in one place, `Pipeline.denoiser` (conditioning.guided): classifier-free guidance,
any number of gradient guides and classifier guidance stack into one Denoiser that every sampler and
editor takes; guides with the source's post-step rule run as a per-step callback beside it. The checks
of labels, prompts and guidance are conditioning.py; an adapter folder's I/O is store/adapter.py.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import conditioning as conditions
from . import editing
from .config import ConfigError
from .device import autocast, check_precision, module_device, randn, resolve_device, resolve_precision
from .guidance import Guide
from .nn.lora import get_lora_scale, set_lora_scale
from .progress import bar as progress_bar
from .samplers import Denoiser, Sampler, get_sampler
from .schedule import NoiseSchedule
from .store.adapter import attach_adapter, is_adapter_folder, read_adapter, resolve_base
from .store.hub import resolve_folder

# The spacing each sampler family does best with at few steps (Lin et al. 2023 recommend "trailing").
DEFAULT_SPACING = "trailing"
DEFAULT_SAMPLER = "dpmpp_2m"    # for a run; a diffusers folder's default is its own scheduler


class Pipeline:
    """A denoising network with its noise schedule; the high-level entry point (see DESIGN.md).

    model(x, t, **cond) returns the prediction_type; image_shape is (C, H, W) of what the model
    denoises; num_classes > 0 for a class-conditional model (label -1 = the null class).
    With an autoencoder (latent diffusion), image_shape is the pixel images' shape, latent_shape the
    model's, and images are encoded on the way in and decoded on the way out. A model with
    `encode_text` (nn.network.TextToImageModel) takes prompts. scheduler_config: a diffusers folder's
    scheduler config, whose settings are the sampling defaults (`default_sampler_options`).
    """

    def __init__(self, model: torch.nn.Module | Callable, schedule: NoiseSchedule, *, image_shape,
                 prediction_type: str = "epsilon", num_classes: int = 0, class_names: Sequence[str] = (),
                 config=None, device: str | torch.device | None = None, precision: str = "auto", source: str = "",
                 latent_shape=None, autoencoder=None, scheduler_config: dict | None = None):
        self.device = resolve_device(module_device(model) if device is None else device)   # None: the model's
        self.precision = resolve_precision(check_precision(precision, self.device), self.device)
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        self.schedule, self.config, self.source = schedule, config, source
        self.prediction_type, self.num_classes = prediction_type, int(num_classes)
        if prediction_type == "epsilon" and float(schedule.alphas_cumprod[-1]) == 0.0:
            from .schedule import ZERO_SNR_EPSILON
            raise ConfigError(ZERO_SNR_EPSILON)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.latent_shape = tuple(int(v) for v in latent_shape) if latent_shape is not None else self.image_shape
        self.autoencoder = autoencoder.to(self.device).eval() if autoencoder is not None else None
        self.class_names = list(class_names)
        self.scheduler_config = scheduler_config
        self.compiled = None            # the torch.compile'd network call, after `compile`
        self.graphed = None             # the network call replayed from CUDA graphs, after `use_cuda_graphs`
        self.adapter = None             # adapters.Adapter: the LoRA adapter on the model and its base's reference

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "auto", weights: str = "ema",
             precision: str = "auto") -> "Pipeline":
        """Load runs/NAME (or a Hub repo id in the local HF cache): EMA weights (or "raw"), schedule and config,
        checked against each other; a LoRA adapter folder (adapter.json) loads on its base (`load_adapter`), a
        diffusers folder or a diffusekit export through `from_diffusers`."""
        from .interop.diffusers import is_diffusers_folder
        run_dir = resolve_folder(run_dir)
        if is_diffusers_folder(run_dir):        # a diffusers folder or an export: its own weights, no EMA choice
            return cls.from_diffusers(run_dir, device=device, precision=precision)
        if is_adapter_folder(run_dir):
            return cls.load_adapter(run_dir, device=device, precision=precision)
        from .store.run import load_run
        device = resolve_device(device)
        cfg, model, extra = load_run(run_dir, device=device, weights=weights)
        m = cfg.model
        model_shape, ae, image_shape = (m.in_channels, m.image_size, m.image_size), None, None
        if cfg.latent is not None:
            from .store.autoencoder import load_autoencoder
            ae = load_autoencoder(Path(run_dir) / "autoencoder", device=device)
            image_shape = (cfg.latent.channels, cfg.latent.image_size, cfg.latent.image_size)
        return cls(model, NoiseSchedule.from_config(cfg.schedule), image_shape=image_shape or model_shape,
                   latent_shape=model_shape, prediction_type=m.prediction_type, num_classes=m.num_classes,
                   class_names=extra.get("class_names") or (), config=cfg, device=device, precision=precision,
                   source=str(run_dir), autoencoder=ae)

    @classmethod
    def from_diffusers(cls, path: str | Path, device: str | torch.device = "auto", precision: str = "auto", *,
                       null_class_label: int | None = None) -> "Pipeline":
        """A diffusers pipeline folder (or Hub repo id in the HF cache) driven by diffusekit's samplers and editors."""
        from .interop.diffusers import diffusers_pipeline_parts
        return cls(**diffusers_pipeline_parts(resolve_folder(path), device=device, precision=precision,
                                              null_class_label=null_class_label))

    @classmethod
    def open(cls, path: str | Path, device: str | torch.device = "auto", precision: str = "auto") -> "Pipeline":
        """A run folder (`load`) or a local diffusers pipeline folder (`from_diffusers`), whichever path is."""
        return cls.load(path, device=device, precision=precision)

    # --- LoRA adapters (store/adapter.py: the folder; adapters.py: add, merge; nn/lora.py: the layers) ---
    @classmethod
    def load_adapter(cls, path: str | Path, base: str | Path | None = None, device: str | torch.device = "auto",
                     precision: str = "auto") -> "Pipeline":
        """A LoRA adapter folder on its base (the run or diffusers folder it records, or `base`), at lora_scale 1.

        Refused, naming the fix, when the base is not there (pass base=) or its weights changed (hash)."""
        record, state = read_adapter(path)
        base_dir = resolve_base(path, record, base)
        pipe = cls.load(base_dir, device=device, weights=record["base"].get("weights") or "ema", precision=precision)
        attach_adapter(pipe, base_dir, path, record, state)
        return pipe

    @property
    def lora_scale(self) -> float | None:
        """The adapter's share: 0 = the base exactly, 1 = the fine-tuned model (None: no adapter)."""
        return get_lora_scale(self.model) if isinstance(self.model, torch.nn.Module) else None

    @lora_scale.setter
    def lora_scale(self, scale: float) -> None:
        set_lora_scale(self.model, scale)
        if self.graphed is not None:            # recorded graphs hold the old scale
            self.use_cuda_graphs("on")

    @contextmanager
    def lora_scaled(self, scale: float):
        """`with pipe.lora_scaled(s):` the adapter at scale s inside, its scale before restored after."""
        kept, self.lora_scale = self.lora_scale, scale
        try:
            yield self
        finally:
            self.lora_scale = kept

    # --- the model call and guidance ------------------------------------------------------------
    def sampler_for(self, name: str = "dpmpp_2m", timestep_spacing: str | None = None, **options) -> Sampler:
        """A sampler from the registry bound to this model's schedule and prediction type."""
        return get_sampler(name, self.schedule, prediction_type=self.prediction_type,
                           timestep_spacing=timestep_spacing or DEFAULT_SPACING, **options)

    def default_sampler_options(self, sampler: str | None = None) -> tuple[str, dict, str]:
        """(sampler name, options, note) that `sample` uses for sampler (None: this pipeline's default): a run's is
        dpmpp_2m with no options; a diffusers folder's, interop.folder_sampler.folder_sampler (docs/INTEROP.md)."""
        if self.scheduler_config is None:
            return sampler or DEFAULT_SAMPLER, {}, ""
        from .interop.folder_sampler import folder_sampler
        return folder_sampler(self.scheduler_config, sampler)

    def resolve_sampler(self, sampler: str | None = None, timestep_spacing: str | None = None,
                        **options) -> Sampler:
        """The Sampler that `sample(sampler=..., timestep_spacing=..., **options)` runs: the defaults of
        `default_sampler_options(sampler)` with the caller's options on top (for counting NFE, printing)."""
        return self._sampler(sampler, timestep_spacing, options, warn=False)

    def _sampler(self, sampler: str | None, timestep_spacing: str | None, options: dict, warn: bool = True) -> Sampler:
        name, defaults, note = self.default_sampler_options(sampler)
        if note and warn:
            warnings.warn(note, UserWarning, stacklevel=4)   # the caller of sample (under no_grad)
        spacing = timestep_spacing or defaults.pop("timestep_spacing", None)
        defaults.pop("timestep_spacing", None)
        if spacing not in (None, "leading"):    # diffusers adds steps_offset to "leading" timesteps only
            defaults.pop("steps_offset", None)
        return self.sampler_for(name, spacing, **{**defaults, **options})

    def compile(self, choice: str = "on", calls: int = 0, batch_size: int = 1) -> bool:
        """torch.compile the network call from now on: choice "on", "off", or "auto" (where the measured
        break-even says `calls` model calls at `batch_size` repay the compile: fastpath.compile_wanted).
        Same results as eager to float tolerance; a failed compile warns once and runs eagerly. Returns
        whether the network is now compiled."""
        from .fastpath import compile_wanted, maybe_compile
        wanted = compile_wanted(choice, self.device, calls, training=False, batch_size=batch_size)
        self.compiled = maybe_compile(self.model, True) if wanted else None
        if self.graphed is not None:                # the graphs record the compiled call from now on
            self.use_cuda_graphs("on")
        return wanted

    def use_cuda_graphs(self, choice: str = "auto") -> bool:
        """Replay the network call from CUDA graphs (one per input shape) from now on: "auto" (on a CUDA
        device), "on" (refused elsewhere) or "off". Same results as eager (each graph's first replay is
        checked against it); calls with autograd on (gradient guidance) run eagerly. Returns whether on."""
        from .fastpath import GraphedModel, cuda_graphs_wanted
        try:
            wanted = cuda_graphs_wanted(choice, self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.graphed = GraphedModel(self._network_call()) if wanted else None
        return wanted

    def network(self) -> Callable:
        """The raw model call in this pipeline's precision, returning float32 (from CUDA graphs when on)."""
        return self.graphed if self.graphed is not None else self._network_call()

    def _network_call(self) -> Callable:
        model, device, precision = self.compiled or self.model, self.device, self.precision

        def call(x, t, **cond):
            with autocast(device, precision):
                return model(x, t, **cond).float()
        return call

    def denoiser(self, guidance_scale: float = 1.0, guides: Sequence[Guide] = (), classifier: Callable | None = None,
                 classifier_scale: float = 0.0, target_class=None, negative_prompt: str = "") -> Denoiser:
        """One Denoiser with classifier-free guidance (eps_u + w (eps_c - eps_u)), the eps-space gradient
        guides and classifier guidance toward target_class (default: the class_labels sampled with)
        stacked (guidance.guided_denoiser). For a text model the unconditional branch is negative_prompt."""
        return conditions.guided(self, guidance_scale, guides, classifier, classifier_scale, target_class,
                                 negative_prompt)

    def check_guidance(self, guidance_scale: float, class_labels=None, *, labels_known: bool = True) -> None:
        """Refuse classifier-free guidance this model cannot do: scale != 1 needs a class- or text-conditional
        model, and a class-conditional one the class_labels to guide toward (unless labels_known=False)."""
        conditions.check_guidance(self, guidance_scale, class_labels, labels_known=labels_known)

    def class_labels(self, labels, n: int) -> torch.Tensor | None:
        """Labels as a (n,) long tensor: None, one int (or class name) for all, or one per image."""
        return conditions.class_labels(self, labels, n)

    @property
    def has_text(self) -> bool:
        return hasattr(self.model, "encode_text")

    def prompts(self, prompt, n: int) -> list[str] | None:
        """Prompts as a list of n strings: None, one string for all, or one per image."""
        return conditions.prompts(self, prompt, n)

    def conditioning(self, class_labels, n: int, prompt=None) -> dict:
        """The model's keyword conditioning for n images: class_labels and/or the encoded prompts (a text
        model without a prompt gets the empty prompt)."""
        return conditions.conditioning(self, class_labels, n, prompt)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels -> what the model denoises (scaled latents with an autoencoder, else the images)."""
        return self.autoencoder.encode(images) if self.autoencoder is not None else images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What the model denoises -> pixels."""
        return self.autoencoder.decode(x).float() if self.autoencoder is not None else x

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, sampler: str | None = None, num_steps: int = 20,
               generator: torch.Generator | None = None, class_labels=None, guidance_scale: float = 1.0,
               guides: Sequence[Guide] = (), classifier: Callable | None = None, classifier_scale: float = 0.0,
               target_class=None, batch_size: int = 256, progress: bool = False, callback=None,
               timestep_spacing: str | None = None, noise: torch.Tensor | None = None, prompt=None,
               negative_prompt: str = "", timesteps=None, lora_scale: float | None = None, output: str = "pt",
               **options) -> torch.Tensor | list:
        """n images (n, C, H, W) in [-1, 1], on the CPU.

        All starting noise is drawn first (on the generator's device), so image k starts from the same
        noise whatever the batch size; stochastic samplers draw their step noise per batch from the same
        generator. guides / classifier: see `denoiser`; callback(StepInfo) runs after every step. sampler=None:
        dpmpp_2m, or a diffusers folder's own scheduler (`default_sampler_options`); lora_scale: for this call.
        output="pil": a list of PIL images instead (viz.to_pil), as diffusers pipelines return them.
        """
        conditions.check_output(output, self.image_shape[0])
        if lora_scale is not None:
            with self.lora_scaled(lora_scale):
                return self.sample(n, sampler, num_steps, generator, class_labels, guidance_scale, guides, classifier,
                                   classifier_scale, target_class, batch_size, progress, callback, timestep_spacing,
                                   noise, prompt, negative_prompt, timesteps, output=output, **options)
        if n < 1:
            raise ConfigError(f"n={n}; ask for at least one image.")
        from .memory import check_sampling          # refuse what cannot fit before drawing any noise
        check_sampling(n, batch_size, image_shape=self.image_shape, device=self.device,
                       latent_shape=getattr(self, "latent_shape", None),
                       model_config=getattr(self.config, "model", None), guided=guidance_scale != 1.0)
        self.check_guidance(guidance_scale, class_labels)
        s = self._sampler(sampler, timestep_spacing, options)
        if noise is None:
            noise = randn((n, *self.latent_shape), generator, "cpu")
        full_cond = self.conditioning(class_labels, n, prompt)
        target = None if target_class is None else torch.as_tensor(target_class)
        outs = []
        batches = range(0, n, batch_size)
        if progress and len(batches) > 1:
            batches = progress_bar(batches, desc=f"sampling {n} images", unit="batch")
        for start in batches:
            x = noise[start:start + batch_size].to(self.device)
            cond = {k: v[start:start + batch_size] for k, v in full_cond.items()}
            # one classifier target per image is sliced with its batch
            batch_target = target[start:start + batch_size] if target is not None and target.ndim else target
            den = self.denoiser(guidance_scale, guides, classifier, classifier_scale, batch_target, negative_prompt)
            out = s.sample(den, x, num_steps=None if timesteps is not None else num_steps, generator=generator,
                           timesteps=timesteps, callback=conditions.source_callback(self, guides, cond, callback),
                           progress=progress and n <= batch_size, **cond)
            outs.append(conditions.checked_finite(self.decode(out), "sampling").clamp(-1, 1).cpu())
        return conditions.as_output(torch.cat(outs), output)

    @torch.no_grad()
    def trajectory(self, n: int = 4, sampler: str | None = None, num_steps: int = 20, generator=None,
                   class_labels=None, **guidance):
        """(final images, x_t per step, predicted x0 per step, timesteps) for a denoising picture."""
        xs, x0s, ts = [], [], []

        def record(info):
            xs.append(self.decode(info.x).clamp(-1, 1).cpu())
            x0s.append(self.decode(info.x0_pred).clamp(-1, 1).cpu())
            ts.append(info.t)
        out = self.sample(n, sampler, num_steps, generator, class_labels, callback=record, **guidance)
        return out, xs, x0s, ts

    # --- editing ------------------------------------------------------------------------------
    def load_image(self, path: str | Path, alpha_background: str | None = None) -> torch.Tensor:
        """An image file as a (1, C, H, W) tensor in [-1, 1] at this model's size and channels.

        Transparent pixels are composited onto alpha_background ("black", "white" or "R,G,B"),
        by default the one the run's training images were composited onto.
        """
        from .data import load_image
        c, h, _ = self.image_shape
        trained_on = getattr(getattr(self.config, "data", None), "alpha_background", "black")
        return load_image(path, image_size=h, channels=c, alpha_background=alpha_background or trained_on)

    def load_mask(self, path: str | Path, threshold: float = 0.5) -> torch.Tensor:
        """A mask image as a (1, 1, H, W) tensor of 0/1: white (> threshold) = fill, black = keep."""
        from .data.images import load_mask
        return load_mask(path, self.image_shape[1:], threshold)

    @torch.no_grad()
    def edit(self, image: torch.Tensor, strength: float = 0.5, sampler: str | None = None, num_steps: int = 50,
             generator=None, class_labels=None, prompt=None, **guidance_and_options) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): noise the image to t = strength * T, then denoise it.

        Guidance keywords (guidance_scale, guides, classifier, classifier_scale, negative_prompt) are as
        for `sample`; a latent model edits the image's latents. The sampler defaults as for `sample`.
        """
        guidance, options = conditions.split_guidance(guidance_and_options)
        s = self._sampler(sampler, options.pop("timestep_spacing", None), options)
        image = conditions.check_image(self, image)
        self.check_guidance(guidance.get("guidance_scale", 1.0), class_labels)
        cond = self.conditioning(class_labels, len(image), prompt)
        if guidance.get("guides"):
            conditions.refuse_source_guides(guidance["guides"], "edit")
        out = editing.sdedit(s, self.denoiser(**guidance), self.encode(image),
                             strength, num_steps, generator, **cond)
        if strength == 0:
            return image.cpu()
        return conditions.checked_finite(self.decode(out), "SDEdit").clamp(-1, 1).cpu()

    def ddim(self) -> Sampler:
        """The deterministic DDIM sampler that inversion and reconstruction share; from a diffusers folder
        its plan carries over, its x0 bounds do not (interop.folder_sampler.inversion_options)."""
        from .interop.folder_sampler import inversion_options
        return self.sampler_for("ddim", eta=0.0, **inversion_options(self.scheduler_config))

    @torch.no_grad()
    def invert(self, image: torch.Tensor, num_steps: int = 50, refine_steps: int = 0, class_labels=None,
               prompt=None):
        """DDIM inversion: the x_T (latent x_T for a latent model) that deterministic DDIM maps back to the image."""
        image = conditions.check_image(self, image)
        return editing.invert(self.ddim(), self.denoiser(), self.encode(image), num_steps, refine_steps=refine_steps,
                              **self.conditioning(class_labels, len(image), prompt))

    @torch.no_grad()
    def reconstruct(self, x_T: torch.Tensor, num_steps: int = 50, class_labels=None, prompt=None, **guidance):
        """DDIM (eta = 0) from an inverted x_T, optionally under another class, prompt or guidance; pixels out."""
        self.check_guidance(guidance.get("guidance_scale", 1.0), class_labels)
        out = editing.reconstruct(self.ddim(), self.denoiser(**guidance), x_T.to(self.device), num_steps,
                                  **self.conditioning(class_labels, len(x_T), prompt))
        return conditions.checked_finite(self.decode(out), "reconstruction").cpu()

    @torch.no_grad()
    def inpaint_sampler(self, sampler: str | None = None) -> str | None:
        """The sampler `inpaint` runs: the one named, else a diffusers folder's own (None), else ddim for a run."""
        return sampler or (None if self.scheduler_config is not None else "ddim")

    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, sampler: str | None = None, num_steps: int = 50,
                generator=None, resample: int = 1, class_labels=None, prompt=None,
                **guidance_and_options) -> torch.Tensor:
        """Fill the region where mask == 1; pixels where mask == 0 stay exactly the input's.

        A latent model fills the latent cells that any masked pixel touches and the known pixels are
        pasted back in pixel space at the end. sampler=None: ddim for a run, else as for `sample`.
        """
        guidance, options = conditions.split_guidance(guidance_and_options)
        sampler = self.inpaint_sampler(sampler)
        s = self._sampler(sampler, options.pop("timestep_spacing", None), options)
        image, mask = conditions.check_image(self, image), mask.to(self.device)
        self.check_guidance(guidance.get("guidance_scale", 1.0), class_labels)
        if guidance.get("guides"):
            conditions.refuse_source_guides(guidance["guides"], "inpaint")
        latent_mask = mask
        if self.autoencoder is not None:
            # (.., H, W) -> the latent grid: a cell is filled if any pixel in it is
            latent_mask = torch.nn.functional.adaptive_max_pool2d(mask.float(), self.latent_shape[1:])
        out = editing.inpaint(s, self.denoiser(**guidance), self.encode(image),
                              latent_mask, num_steps, generator, resample=resample,
                              **self.conditioning(class_labels, len(image), prompt))
        out = self.decode(out)
        if self.autoencoder is not None:
            out = torch.where(mask == 0, image, out.clamp(-1, 1))
        return conditions.checked_finite(out, "inpainting").cpu()

