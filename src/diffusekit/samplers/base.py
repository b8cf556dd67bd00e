"""What every sampler shares: the denoiser wrapper, timestep spacing, and the registry."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ConfigError, check_choice
from ..progress import bar as progress_bar
from ..schedule import PREDICTION_TYPES, ZERO_SNR_ALPHA_BAR, NoiseSchedule
from .clipping import BOUND_OPTIONS, BoundedDenoiser, X0Bounds
from .denoiser import Denoiser, Prediction  # noqa: F401  (re-exported: the sampler contract's types)

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' spacings, placed exactly as diffusers does
# plus spacings of our own, placed the same way for every sampler style (see Sampler.plan)
SAMPLER_SPACINGS = TIMESTEP_SPACINGS + ("logsnr",)


@dataclass
class StepInfo:
    """What a per-step callback sees: x after step i, in the VP convention at noise level abar_next.

    The one callback type of the library: samplers and DDIM inversion (where x is the noisier
    point reached by step i, walking the plan backwards) report through it.
    """
    i: int
    t: float              # the timestep the model was called at for this step
    abar_next: float      # noise level of x (1.0 after the final sampling step)
    x: torch.Tensor
    x0_pred: torch.Tensor | None = None   # None where the step has no clean estimate (inversion)


def spaced_timesteps(T: int, n: int, spacing: str, style: str) -> torch.Tensor:
    """The n model-call timesteps in descending order, as diffusers' schedulers of that style place them.

    style "ddim" (DDPM, DDIM): the grid includes t near 0 and the last step jumps to abar = 1.
    style "solver" (DPM-Solver, UniPC): n+1 points with t = 0 dropped, final sigma is 0.
    style "karras" (Euler, Heun): like "ddim", but linspace is not rounded (fractional t).
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    import numpy as np
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    elif style == "solver":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        else:
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1]
        if style == "ddim":
            ts = ts.round()
    else:
        ts = (np.arange(0, n) * (T // n)).round()[::-1]
    return torch.tensor(ts.copy(), dtype=torch.float64)


def logsnr_timesteps(schedule: NoiseSchedule, n: int, style: str = "ddim") -> torch.Tensor:
    """n fractional model-call timesteps, descending, uniform in log-SNR over the schedule's range.

    DPM-Solver (Lu et al. 2022, sec. 3.4) steps uniformly in lambda = log(alpha / sigma), which is
    -log(sigma_k) for k-diffusion's sigma. The grid runs from t = T - 1 to t = 0 and, as in
    spaced_timesteps, style "solver" takes n + 1 points and drops t = 0 (its last step goes to
    sigma = 0 and lands on x0_pred, so a call at t = 0 would be nearly wasted); the other styles
    take n points, t = 0 included. Unlike diffusers' use_lu_lambdas the times are not rounded:
    with abar = schedule.alpha_bar_at(t) the model sees exactly the noise level the solver uses.
    """
    sigmas = schedule.sigmas
    points = n + 1 if style == "solver" else n
    if points == 1:
        return schedule.sigma_to_t(sigmas[-1:])
    # log sigma_i = log sigma_max + i / (points - 1) (log sigma_min - log sigma_max)
    log_sigmas = torch.linspace(float(sigmas[-1].log()), float(sigmas[0].log()), points, dtype=torch.float64)
    return schedule.sigma_to_t(log_sigmas.exp())[:n]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Noise levels spaced uniformly in sigma^(1/rho) (Karras et al. 2022, eq. 5), descending."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


@dataclass
class SamplerSpec:
    """A registry entry: the sampler function and how its timesteps are placed."""
    fn: Callable
    style: str                    # timestep placement style, see spaced_timesteps
    evals_per_step: int = 1       # Heun: 2 (the final step is Euler, so NFE = 2n - 1)
    stochastic: bool = False
    karras: bool = True           # whether use_karras_sigmas is allowed
    options: dict = field(default_factory=dict)  # option name -> default
    first_step_evals: int = 1     # PLMS: 2 (a pseudo improved Euler start, so NFE = n + 1 for n > 1)
    exact_zero_snr: bool = False  # DDIM, DDPM: step from abar = 0 itself (else from ZERO_SNR_ALPHA_BAR)
    clip_keeps_eps: bool = False  # DDIM, DDPM: x0_pred may be bounded with the network's eps kept in the update
    half_steps: int = 0           # PNDM: 3 Runge-Kutta steps that also call the model half-way (Sampler.plan_midpoints)
    log_midpoints: bool = False   # DPM-2: a 2nd call at sqrt(sigma * sigma_next) (Sampler.plan_log_midpoints)
    karras_rounded: bool = False  # Karras sigmas called at rounded timesteps whatever the schedule (diffusers' KDPM2)


SAMPLERS: dict[str, SamplerSpec] = {}
# registry options that act on Sampler.plan, not on the sampler function
PLAN_OPTIONS = ("use_karras_sigmas", "set_alpha_to_one")


def register(name: str, style: str, evals_per_step: int = 1, stochastic: bool = False,
             karras: bool = True, first_step_evals: int = 1, exact_zero_snr: bool = False,
             clip_keeps_eps: bool = False, half_steps: int = 0, log_midpoints: bool = False,
             karras_rounded: bool = False, **options):
    """Decorator: add a sampler function to the registry under name.

    options are the function's keyword knobs with their defaults, plus PLAN_OPTIONS the sampler
    takes (they place the noise levels and do not reach the function).
    """
    def wrap(fn):
        SAMPLERS[name] = SamplerSpec(fn, style, evals_per_step, stochastic, karras, options, first_step_evals,
                                     exact_zero_snr, clip_keeps_eps, half_steps, log_midpoints, karras_rounded)
        return fn
    return wrap


class Sampler:
    """A sampler bound to a schedule and options; see diffusekit.get_sampler.

    Options every sampler takes besides its registry options: steps_offset (added to "leading"
    timesteps, as diffusers does) and the x0_pred bounds of samplers/clipping.py (clip_sample,
    clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value,
    use_clipped_model_output). DDIM and PLMS also take set_alpha_to_one (False: the last step
    ends at abar = alphas_cumprod[0] instead of a clean sample, as diffusers' option of that name).
    """

    def __init__(self, name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 timestep_spacing: str = "trailing", clip_sample: bool = False, **options):
        if name not in SAMPLERS:
            hint = difflib.get_close_matches(name, list(SAMPLERS), n=1)
            raise ConfigError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, SAMPLER_SPACINGS)
        self.spec = SAMPLERS[name]
        self.bounds = X0Bounds(bool(clip_sample), **{k: options.pop(k) for k in BOUND_OPTIONS if k in options})
        if self.bounds.active and not self.bounds.use_clipped_model_output and not self.spec.clip_keeps_eps:
            raise ConfigError(f"use_clipped_model_output=False (bound x0_pred, keep the network's eps) is a DDIM/DDPM "
                              f"choice; sampler {name!r} steps with eps re-derived from the bounded x0_pred. Drop "
                              "the option, or use ddim or ddpm.")
        self.steps_offset = _check_offset(options.pop("steps_offset", 0), timestep_spacing)
        allowed = dict(self.spec.options)
        if self.spec.karras:
            allowed.setdefault("use_karras_sigmas", False)
        for key in options:
            if key not in allowed:
                raise ConfigError(f"sampler {name!r} has no option {key!r}; its options are "
                                  f"{sorted(allowed) or 'none'}.")
        self.options = {**allowed, **options}
        if timestep_spacing == "logsnr" and self.options.get("use_karras_sigmas"):
            raise ConfigError("timestep_spacing='logsnr' and use_karras_sigmas=True both place the noise levels; "
                              "choose one (logsnr: uniform in log-SNR; Karras: uniform in sigma^(1/7)).")
        if "eta" in self.options and not 0.0 <= float(self.options["eta"]) <= 1.0:
            raise ConfigError(f"eta={self.options['eta']!r} is out of range; eta must lie in [0, 1] "
                              "(0 = deterministic DDIM, 1 = DDPM-like ancestral noise).")
        self.name, self.schedule = name, schedule
        self.prediction_type, self.timestep_spacing, self.clip_sample = prediction_type, timestep_spacing, clip_sample

    def _check_steps(self, num_steps) -> int:
        T = self.schedule.num_train_timesteps
        most = T - 1 if (self.spec.style == "solver" and self.timestep_spacing == "leading") else T
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= most:
            raise ConfigError(f"num_steps={num_steps!r} is not allowed for sampler {self.name!r}; "
                              f"use an integer from 1 to {most} (the schedule has {T} training timesteps).")
        return num_steps

    def _check_timesteps(self, timesteps, num_steps) -> torch.Tensor:
        """Explicit model-call times as a float64 tensor, checked: 1-D, finite, in [0, T - 1], descending."""
        T = self.schedule.num_train_timesteps
        try:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"timesteps={timesteps!r} is not a list of numbers ({err}).") from None
        if ts.ndim != 1 or len(ts) == 0 or not bool(torch.isfinite(ts).all()) or \
                float(ts.min()) < 0 or float(ts.max()) > T - 1 or not bool((ts[1:] < ts[:-1]).all()):
            raise ConfigError(f"timesteps={ts.tolist()} are not valid model-call times; give a non-empty, strictly "
                              f"descending list of finite times in [0, {T - 1}] (training-timestep units).")
        if num_steps is not None and num_steps != len(ts):
            raise ConfigError(f"num_steps={num_steps!r} disagrees with the {len(ts)} timesteps given; "
                              f"pass num_steps=None (or {len(ts)}) with explicit timesteps.")
        if self.options.get("use_karras_sigmas"):
            raise ConfigError("explicit timesteps and use_karras_sigmas=True both place the noise levels; choose one.")
        return ts

    def plan(self, num_steps: int | None = None, timesteps=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (n,), abars (n+1,)): model-call times and the noise level before each step,
        then the final one (abar = 1: a clean sample).

        Explicit timesteps (a descending list, fractional allowed, e.g. from diffusekit.tune) replace
        the spacing: the noise levels are then schedule.alpha_bar_at(timesteps), as for "logsnr".
        """
        ts, abars = self._plan(num_steps, timesteps)
        if not self.spec.exact_zero_snr:
            # zero terminal SNR: a sigma or log-SNR solver starts just below it, at abar = 2^-24 (as diffusers)
            abars = torch.where(abars > 0, abars, ZERO_SNR_ALPHA_BAR)
        # set_alpha_to_one=False: the last step ends at abar_0 = 1 - beta_0 (DDIM/PNDM's final_alpha_cumprod)
        final = 1.0 if self.options.get("set_alpha_to_one", True) else float(self.schedule.alphas_cumprod[0])
        return ts, torch.cat([abars, torch.full((1,), final, dtype=torch.float64)])

    def _plan(self, num_steps, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        sched = self.schedule
        if timesteps is not None:
            ts = self._check_timesteps(timesteps, num_steps)
            return ts, sched.alpha_bar_at(ts)
        n = self._check_steps(num_steps)
        if self.timestep_spacing == "logsnr":
            ts = logsnr_timesteps(sched, n, self.spec.style)
            return ts, sched.alpha_bar_at(ts)
        ts = spaced_timesteps(sched.num_train_timesteps, n, self.timestep_spacing, self.spec.style) + self.steps_offset
        if float(ts.max()) > sched.num_train_timesteps - 1:
            raise ConfigError(f"num_steps={n} with steps_offset={self.steps_offset} places a timestep at "
                              f"{int(ts.max())}, past the schedule's last ({sched.num_train_timesteps - 1}); use fewer "
                              "steps or steps_offset=0.")
        if self.options.get("use_karras_sigmas"):
            # Karras et al. 2022: sigmas between the schedule's extremes, times from log-sigma interpolation
            # Euler/Heun take the range of the spaced timesteps, DPM-Solver/UniPC the full schedule (as diffusers)
            if self.spec.style == "karras":
                lo, hi = sched.t_to_sigma(ts[-1]), sched.t_to_sigma(ts[0])
            else:
                lo, hi = sched.sigmas[0], sched.sigmas[-1]
            sigmas = karras_sigmas(float(lo), float(hi), n)
            ts = sched.sigma_to_t(sigmas)
            if self.spec.karras_rounded or (self.spec.style == "solver"
                                            and sched.config.kind not in ("cosine", "squaredcos_cap_v2")):
                # diffusers' DPM-Solver, UniPC and KDPM2 call the model at rounded timesteps here; we follow
                # them so results stay comparable (the noise level itself stays the Karras sigma)
                ts = ts.round()
            return ts, 1 / (1 + sigmas**2)
        return ts, sched.alpha_bar_at(ts)

    def timesteps(self, num_steps: int | None = None, timesteps=None) -> torch.Tensor:
        """The timesteps the model will be called at, in order (Heun's second calls included)."""
        ts, abars = self.plan(num_steps, timesteps)
        if self.spec.log_midpoints:
            # t, then t_mid of the same step (none for a step to sigma = 0)
            mids = self.plan_log_midpoints(abars)
            ts = torch.cat([torch.stack([t, m[0]]) if m else t[None] for t, m in zip(ts, mids)])
        elif self.spec.half_steps:
            # a Runge-Kutta step calls the model at t, twice half-way, and at the next time
            mids = self.plan_midpoints(ts, timesteps)[:self.spec.half_steps]
            rk = [torch.stack([ts[i], m[0], m[0], ts[i + 1]]) for i, m in enumerate(mids) if m is not None]
            ts = torch.cat(rk + [ts[len(rk):]])
        elif self.spec.evals_per_step == 2:
            ts = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        elif self.spec.first_step_evals == 2 and len(ts) > 1:
            # the first step also calls the model at the next time, so that time comes twice (as in
            # diffusers' PNDM with skip_prk_steps)
            ts = torch.cat([ts[:2], ts[1:]])
        return ts

    def plan_midpoints(self, ts: torch.Tensor, timesteps=None) -> list:
        """(t_mid, abar_mid, abar_half) half-way through each step of the plan ts, None for the last step.

        PNDM's Runge-Kutta stages call the model at t_mid (noise level abar_mid), and its first stage
        moves x to abar_half. Spaced plans place both as diffusers' PNDM does: t_mid = t_next + h and
        abar_half at t - h, h = T // n // 2 (integer timesteps; the same point unless T // n is odd).
        Explicit whole-number times follow the same rule with n = len(ts), so a spacing's own timesteps
        given explicitly give that spacing's plan; fractional times and "logsnr": both at (t + t_next) / 2.
        """
        whole = timesteps is not None and bool(torch.all(ts == ts.round()))
        if whole or (timesteps is None and self.timestep_spacing in TIMESTEP_SPACINGS):
            half = self.schedule.num_train_timesteps // len(ts) // 2
            t_mid, t_half = ts[1:] + half, ts[:-1] - half
        else:
            t_mid = t_half = (ts[:-1] + ts[1:]) / 2
        abar_mid, abar_half = self.schedule.alpha_bar_at(t_mid), self.schedule.alpha_bar_at(t_half)
        return [(t, float(a), float(h)) for t, a, h in zip(t_mid, abar_mid, abar_half)] + [None]

    def plan_log_midpoints(self, abars: torch.Tensor) -> list:
        """(t_mid, abar_mid) of each step of a plan with levels abars, None for a step to sigma = 0.

        DPM-2 (diffusers' KDPM2) calls the model half-way in log sigma, sigma_mid = sqrt(sigma * sigma_next),
        at the fractional time schedule.sigma_to_t(sigma_mid) (log-sigma interpolation, as diffusers does).
        """
        sigmas = ((1 - abars).clamp(min=0) / abars).sqrt()
        out = []
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            sigma_mid = (sigma * sigma_next).sqrt()
            out.append((self.schedule.sigma_to_t(sigma_mid), float(1 / (1 + sigma_mid**2))) if sigma_next > 0 else None)
        return out

    def nfe(self, num_steps: int | None = None, timesteps=None) -> int:
        """Number of model evaluations for num_steps steps (or the explicit timesteps), counted honestly."""
        return len(self.timesteps(num_steps, timesteps))

    def sample(self, model, x_T: torch.Tensor, num_steps: int | None = None, generator: torch.Generator | None = None,
               callback: Callable[[StepInfo], torch.Tensor | None] | None = None, progress: bool = False,
               start_step: int = 0, stop_step: int | None = None, timesteps=None, **cond) -> torch.Tensor:
        """Run the sampler from x_T (N(0, I) noise, or a VP x_t at timesteps[start_step]) to x0.

        model(x, t, **cond) returns the sampler's prediction type, or model is already a Denoiser.
        callback(StepInfo) runs after every step; a tensor it returns replaces x.
        start_step > 0 skips the first steps (SDEdit, img2img); stop_step < num_steps ends early and
        returns x at the noise level abars[stop_step], in the VP convention like every result.
        Multistep solvers start their history afresh at start_step.
        num_steps defaults to 50; explicit timesteps (see plan) replace num_steps and the spacing.
        """
        if num_steps is None and timesteps is None:
            num_steps = 50
        ts, abars = self.plan(num_steps, timesteps)
        stop = len(ts) if stop_step is None else stop_step
        if not 0 <= start_step < stop <= len(ts):
            raise ConfigError(f"start_step={start_step}, stop_step={stop_step}: need 0 <= start_step < stop_step "
                              f"<= {len(ts)} for a plan of {len(ts)} steps.")
        opts = {k: v for k, v in self.options.items() if k not in PLAN_OPTIONS}
        if self.spec.half_steps:
            opts["midpoints"] = self.plan_midpoints(ts, timesteps)[start_step:stop]
        elif self.spec.log_midpoints:
            opts["midpoints"] = self.plan_log_midpoints(abars)[start_step:stop]
        # a method that evaluates at the next level too (Heun, PLMS's start, PRK) needs the time it stops at
        ts = ts[start_step:stop + (self.spec.evals_per_step == 2 or self.spec.first_step_evals == 2
                                   or bool(self.spec.half_steps))]
        abars = abars[start_step:stop + 1]
        denoiser = model if isinstance(model, Denoiser) else Denoiser(model, self.prediction_type)
        if self.bounds.active:  # bound the x0_pred of whatever denoiser came in, guided ones included
            denoiser = BoundedDenoiser(denoiser, self.bounds)
        if progress:
            callback = _with_progress(callback, len(ts), self.name)
        return self.spec.fn(denoiser, x_T, ts, abars, generator=generator, callback=callback, cond=cond, **opts)

    def __repr__(self):
        extra = {**({"steps_offset": self.steps_offset} if self.steps_offset else {}), **self.bounds.changed()}
        return (f"Sampler({self.name!r}, prediction_type={self.prediction_type!r}, "
                f"timestep_spacing={self.timestep_spacing!r}, options={self.options}"
                + "".join(f", {k}={v!r}" for k, v in extra.items()) + ")")


def _check_offset(steps_offset, spacing: str) -> int:
    """diffusers adds steps_offset to "leading" timesteps only (Stable Diffusion's configs hold 1)."""
    if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ConfigError(f"steps_offset={steps_offset!r}; give a non-negative integer (Stable Diffusion uses 1).")
    if steps_offset and spacing != "leading":
        raise ConfigError(f"steps_offset={steps_offset} acts on timestep_spacing='leading' only (diffusers ignores it "
                          f"otherwise); drop it, or use timestep_spacing='leading' (got {spacing!r}).")
    return steps_offset


def _with_progress(callback, total, name):
    bar = progress_bar(total=total, desc=name, leave=False)

    def cb(info: StepInfo):
        bar.update(1)
        if info.abar_next >= 1.0:
            bar.close()
        return callback(info) if callback is not None else None
    return cb


def run_callback(callback, i, t, abar_next, x, x0_pred):
    """Call the per-step callback (if any) and return the possibly replaced x."""
    if callback is None:
        return x
    out = callback(StepInfo(i, float(t), float(abar_next), x, x0_pred))
    return x if out is None else out


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x from an explicit generator (never the global RNG state
    when a generator is given), drawn on the generator's device and moved to x's: a CPU generator
    drives a CUDA sample reproducibly."""
    source = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=source, dtype=x.dtype).to(x.device)


def get_sampler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                timestep_spacing: str = "trailing", clip_sample: bool = False, **options) -> Sampler:
    """Look a sampler up in the registry and bind it to a schedule and options."""
    return Sampler(name, schedule, prediction_type, timestep_spacing, clip_sample, **options)


def lagrange_basis(nodes: list[float], j: int) -> list[float]:
    """Coefficients (lowest degree first) of the Lagrange basis polynomial L_j on nodes (multistep weights)."""
    from numpy.polynomial import polynomial as P
    basis = [1.0]
    for k, u_k in enumerate(nodes):
        if k != j:
            # L_j(u) = prod_{k != j} (u - u_k) / (u_j - u_k)
            basis = P.polymul(basis, [-u_k / (nodes[j] - u_k), 1 / (nodes[j] - u_k)])
    return list(basis)


def sigma_of(abar: float) -> float:
    """k-diffusion's sigma = sqrt((1 - abar) / abar); 0 for a clean sample."""
    return math.sqrt(max(1.0 - abar, 0.0) / abar)
