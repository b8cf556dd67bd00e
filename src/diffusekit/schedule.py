"""The forward process q: beta schedules, alphas_cumprod, add_noise, the posterior, conversions.

Everything is computed in float64 and cast to the caller's dtype and device at the point of use
(as EDM and improved-diffusion do), so the closed-form tests hold to float precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .config import Config, check_range

ScheduleKind = Literal["linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# What a sampler that needs a finite sigma or log-SNR uses for abar = 0 (zero terminal SNR): diffusers'
# value, "close to 0 without being 0 so first sigma is not inf" (EulerDiscreteScheduler and others)
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


@dataclass
class ScheduleConfig(Config):
    kind: ScheduleKind = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4  # linear / scaled_linear / sigmoid only
    beta_end: float = 0.02
    rescale_zero_terminal_snr: bool = False  # Lin et al. 2023, "Common diffusion noise schedules are flawed"

    def validate(self):
        check_range("num_train_timesteps", self.num_train_timesteps, lo=2)
        check_range("beta_start", self.beta_start, lo=0, hi=1, lo_open=True, hi_open=True)
        check_range("beta_end", self.beta_end, lo=0, hi=1, lo_open=True, hi_open=True)


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linear in sqrt(beta), as used by latent diffusion (Stable Diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_alpha_bar(t: torch.Tensor | float, s: float = 0.008):
    """Closed-form abar(t) of the cosine schedule, t in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule; same as diffusers' squaredcos_cap_v2."""
    i = torch.arange(T, dtype=torch.float64)
    # beta_t = 1 - abar(t+1)/abar(t), clipped to max_beta to avoid the singularity at t = T   (iDDPM eq. 17)
    betas = 1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T)
    return betas.clamp(max=max_beta)


def sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """A sigmoid ramp from beta_start to beta_end (as in GeoDiff and diffusers' "sigmoid")."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


# eps-prediction cannot define x0 at abar_T = 0: x0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T) divides by 0
ZERO_SNR_EPSILON = ("prediction_type 'epsilon' with a zero-terminal-SNR schedule (rescale_zero_terminal_snr: "
                    "abar_T = 0) cannot work: at t = T - 1 the image is pure noise, so x0 = (x_T - eps) / sqrt(abar_T) "
                    "divides by zero and samplers return NaN or noise. Use prediction_type 'v_prediction' (as Lin et al. "
                    "2023 do) or 'sample', or a schedule without the rescale.")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 exactly (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def extract(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather values[t] (float64 table) and reshape to broadcast over x: (B,) -> (B, 1, ..., 1)."""
    t = torch.as_tensor(t, device=values.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    out = values[t.long()]
    return out.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def as_batch(value, x: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar (python float, 0-d or (B,) tensor) as (B, 1, ..., 1) in x's dtype/device."""
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """The variance-preserving forward process q(x_t | x0) of DDPM, defined by its betas.

    Plain data, not a module: float64 tables of length num_train_timesteps.
    """

    def __init__(self, betas: torch.Tensor, config: ScheduleConfig | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1].")
        self.config = config or ScheduleConfig(num_train_timesteps=len(betas))
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t   (DDPM eq. 7)
        self.posterior_variance = (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod) * betas
        # mu_tilde = c0 * x0 + ct * x_t   (DDPM eq. 7)
        self.posterior_mean_coef_x0 = self.alphas_cumprod_prev.sqrt() * betas / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = self.alphas.sqrt() * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, rescale_zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Build a named schedule: "linear", "scaled_linear", "cosine" (= "squaredcos_cap_v2"), "sigmoid"."""
        return cls.from_config(ScheduleConfig(kind, num_train_timesteps, beta_start, beta_end,
                                              rescale_zero_terminal_snr))

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        T = cfg.num_train_timesteps
        if cfg.kind == "linear":
            betas = linear_betas(T, cfg.beta_start, cfg.beta_end)
        elif cfg.kind == "scaled_linear":
            betas = scaled_linear_betas(T, cfg.beta_start, cfg.beta_end)
        elif cfg.kind in ("cosine", "squaredcos_cap_v2"):
            betas = cosine_betas(T)
        else:
            betas = sigmoid_betas(T, cfg.beta_start, cfg.beta_end)
        if cfg.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, cfg)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def snr(self) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t)   (Kingma et al. 2021, VDM)."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    @property
    def sigmas(self) -> torch.Tensor:
        """k-diffusion's sigma_t = sqrt((1 - abar_t) / abar_t): x_t / sqrt(abar_t) = x0 + sigma_t * eps.

        A zero abar (zero terminal SNR) counts as ZERO_SNR_ALPHA_BAR here, so sigma_max is 4096, not inf.
        """
        abar = torch.where(self.alphas_cumprod > 0, self.alphas_cumprod, ZERO_SNR_ALPHA_BAR)
        return ((1 - abar) / abar).sqrt()

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar at (possibly fractional) timesteps, interpolating log(sigma) linearly between integers."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.is_floating_point(t) or bool((t == t.round()).all()):
            return self.alphas_cumprod[t.round().long().clamp(0, self.num_train_timesteps - 1)]
        sigma = self.t_to_sigma(t)
        return 1 / (1 + sigma**2)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at fractional t, linear interpolation in t of sigma (as diffusers' Euler/Heun do)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        s = self.sigmas
        return (1 - w) * s[lo] + w * s[hi]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose sigma equals the given one, interpolating log(sigma) (k-diffusion)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self.sigmas.log()
        log_sigma = sigma.clamp(min=1e-10).log()
        # index of the last table entry <= log_sigma, then interpolate to the next one
        idx = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True).reshape(log_sigma.shape) - 1
        idx = idx.clamp(0, len(log_sigmas) - 2)
        low, high = log_sigmas[idx], log_sigmas[idx + 1]
        w = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return idx.to(torch.float64) + w

    # --- the forward process ------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x0) in one jump; t: integer tensor of shape [B]."""
        # x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps   (DDPM eq. 4)
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + \
            extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x0); the variance is (B, 1, ..., 1)."""
        # mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        mean = extract(self.posterior_mean_coef_x0, t, x_t) * x0 + extract(self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t)

    # --- conversions between eps, x0 and v ----------------------------------------------------
    def get_velocity(self, x0, noise, t):
        """The v target at integer timesteps t: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        return velocity(x0, noise, extract(self.alphas_cumprod, t, x0))

    def training_target(self, prediction_type: str, x0, noise, t):
        """What a network of the given prediction type should output for (x0, noise, t)."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return self.get_velocity(x0, noise, t)
        raise ValueError(f"prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}.")

    def __repr__(self):
        c = self.config
        return f"NoiseSchedule(kind={c.kind!r}, T={self.num_train_timesteps})"


# The conversions take abar as a tensor that broadcasts over x (see as_batch), so they work at any
# (also fractional) timestep. They are the single home of the eps/x0/v algebra.

def x0_from_eps(x_t, eps, abar):
    # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)   (DDPM eq. 4 solved for x0)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(x_t, x0, abar):
    # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def velocity(x0, eps, abar):
    # v = sqrt(abar) eps - sqrt(1 - abar) x0   (Salimans & Ho 2022, sec. 4)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def x0_eps_from_v(x_t, v, abar):
    # x0 = sqrt(abar) x_t - sqrt(1 - abar) v;  eps = sqrt(1 - abar) x_t + sqrt(abar) v
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v, (1 - abar).sqrt() * x_t + abar.sqrt() * v


def to_x0_eps(prediction_type: str, model_output, x_t, abar):
    """Turn a network output of the given prediction type into (x0_pred, eps)."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, abar), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, abar)
    if prediction_type == "v_prediction":
        return x0_eps_from_v(x_t, model_output, abar)
    raise ValueError(f"prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}.")
