"""Guidance as wrappers around the model call: classifier-free, gradient (loss) and classifier guidance.

Every wrapper is called exactly like what it wraps, so any sampler takes it unchanged:
ClassifierFreeGuidance wraps a raw network `model(x, t, **cond)` (or a Denoiser, and is then a
Denoiser itself), while GradientGuidance and ClassifierGuidance wrap a `Denoiser` (they need abar
to turn gradients into an eps correction) and are Denoisers themselves. `guided_denoiser` stacks
them in one place; `SourceGuidance` is the one rule that acts on x after each step instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .samplers.base import Denoiser, Prediction, StepInfo
from .schedule import NoiseSchedule, as_batch, x0_from_eps

WEIGHTINGS = ("sqrt_abar", "constant", "one_minus_abar")
GUIDE_WEIGHTINGS = WEIGHTINGS + ("source",)   # "source": the post-step rule of SourceGuidance


# --- classifier-free guidance ----------------------------------------------------------------

class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2021, eq. 6) with one batched model call per step.

    out = out_uncond + scale * (out_cond - out_uncond); scale = 0 is the unconditional model,
    scale = 1 the conditional one, scale > 1 sharpens towards the condition.
    The unconditional half replaces `class_labels` by `null_label` (the UNet's learned null class)
    and any key in `null_cond` (e.g. an empty-prompt context) by the given value. If `model` is a
    Denoiser, x0 and eps are mixed alike and the wrapper is a Denoiser too.
    """

    def __new__(cls, model: Callable, *args, **kwargs):
        # a Denoiser in, a Denoiser out: samplers tell the two apart with one isinstance check
        if cls is ClassifierFreeGuidance and isinstance(model, Denoiser):
            cls = GuidedDenoiser
        return super().__new__(cls)

    def __init__(self, model: Callable, scale: float, null_label: int = -1, null_cond: dict | None = None,
                 label_key: str = "class_labels"):
        if not math.isfinite(float(scale)):
            raise ValueError(f"guidance scale {scale!r} is not a finite number; use e.g. 1 (none) to 5.")
        self.model, self.scale, self.null_label = model, float(scale), null_label
        self.null_cond, self.label_key = dict(null_cond or {}), label_key

    def _null(self, cond: dict, batch: int) -> dict:
        if self.label_key not in cond and not self.null_cond:
            raise ValueError(f"classifier-free guidance needs a condition to drop: pass {self.label_key}=... "
                             f"(got keys {sorted(cond)}), or give null_cond={{key: unconditional value}}.")
        missing = sorted(set(self.null_cond) - set(cond))
        if missing:
            raise ValueError(f"null_cond has keys {missing} that the sampling condition lacks (it has "
                             f"{sorted(cond)}); pass the conditional values too, e.g. {missing[0]}=...")
        null = dict(cond)
        if self.label_key in cond and self.label_key not in self.null_cond:
            null[self.label_key] = torch.full_like(torch.as_tensor(cond[self.label_key]), self.null_label)
        null.update({k: _expand_batch(v, batch) for k, v in self.null_cond.items()})
        return null

    def __call__(self, x: torch.Tensor, t, *abar, **cond):
        # abar is passed only when the wrapped model is a Denoiser: denoiser(x_t, t, abar, **cond)
        B = x.shape[0]
        if self.label_key in cond:  # one label for the whole batch is allowed
            labels = torch.as_tensor(cond[self.label_key], dtype=torch.long, device=x.device)
            cond = {**cond, self.label_key: labels.expand(B) if labels.ndim == 0 else labels}
        null = self._null(cond, B)
        # one call on the batch [cond; uncond]: (B, ...) -> (2B, ...)
        both = {k: _cat_pair(cond[k], null[k], B) for k in null}
        out = self.model(torch.cat([x, x]), _cat_pair(t, t, B), *[_cat_pair(a, a, B) for a in abar], **both)
        if isinstance(out, Prediction):
            return Prediction(*(self._mix(f[B:], f[:B]) for f in out))
        return self._mix(out[B:], out[:B])

    def _mix(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # eps~ = eps_u + w (eps_c - eps_u) = (1 - w) eps_u + w eps_c   (CFG, Ho & Salimans 2021, eq. 6)
        # Written as an affine combination so w = 0 and w = 1 return exactly one branch.
        # The same mix is right for v and x0 outputs: at fixed x_t, eps, x0 and v are affine functions of
        # one another (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), v = sqrt(abar) eps - sqrt(1 - abar) x0),
        # and an affine map commutes with a combination whose weights (1 - w) + w sum to one.
        w = self.scale
        return (1 - w) * uncond + w * cond


class GuidedDenoiser(ClassifierFreeGuidance, Denoiser):
    """Classifier-free guidance around a Denoiser: mixes x0 and eps alike (see ClassifierFreeGuidance)."""


def _cat_pair(a, b, batch: int):
    """Stack the conditional and unconditional values along the batch, or pass shared values through."""
    if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == batch:
        return torch.cat([a, torch.as_tensor(b, device=a.device, dtype=a.dtype).expand_as(a)])
    if isinstance(b, torch.Tensor) and b.ndim > 0 and b.shape[0] == batch:
        return torch.cat([torch.as_tensor(a, device=b.device, dtype=b.dtype).expand_as(b), b])
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b):
        return a  # scalar timestep or abar shared by all samples
    if a is b or (not isinstance(a, torch.Tensor) and a == b):
        return a
    raise ValueError("classifier-free guidance can only batch per-sample tensors (leading dimension = batch "
                     f"size {batch}) or values shared by both branches; got {type(a).__name__} and "
                     f"{type(b).__name__}.")


def _expand_batch(v, batch: int):
    # a null value given for one sample (e.g. one empty-prompt embedding) serves the whole batch
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == 1 and batch != 1:
        return v.expand(batch, *v.shape[1:])
    return v


# --- gradient guidance from a loss on x0_pred ----------------------------------------------

def _weighting_fn(weighting) -> Callable:
    if callable(weighting):
        return weighting
    if weighting == "sqrt_abar":
        return lambda t, abar: abar.sqrt()
    if weighting == "constant":
        return lambda t, abar: torch.ones_like(abar)
    if weighting == "one_minus_abar":
        return lambda t, abar: 1 - abar
    raise ValueError(f"weighting={weighting!r} is not allowed; choose one of {list(WEIGHTINGS)} "
                     "or pass a callable weight(t, abar) -> tensor broadcastable to x.")


def _require_denoiser(denoiser, who: str):
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"{who} wraps a Denoiser (it needs abar to scale the gradient); got "
                        f"{type(denoiser).__name__}. Wrap the network first: "
                        "diffusekit.Denoiser(model, prediction_type=...).")


def _grad_context():
    if torch.is_inference_mode_enabled():
        raise RuntimeError("gradient guidance needs autograd, which torch.inference_mode() disables; "
                           "sample under torch.no_grad() instead (the guidance re-enables grad locally).")
    return torch.enable_grad()


def _check_window(t_window, name: str) -> None:
    """Refuse a t_window that is not (t_min, t_max) with t_min <= t_max (NaN would silently switch guidance off)."""
    if t_window is None:
        return
    try:
        t_min, t_max = (float(v) for v in t_window)
    except (TypeError, ValueError):
        t_min = t_max = math.nan
    if math.isnan(t_min) or math.isnan(t_max) or t_min > t_max:
        raise ValueError(f"{name}: t_window={tuple(t_window) if isinstance(t_window, (list, tuple)) else t_window!r}; "
                         f"expected two numbers (t_min, t_max) with t_min <= t_max, in training-timestep units "
                         f"(e.g. 0 and 500).")


def _in_window(t, t_window) -> bool:
    if t_window is None:
        return True
    t_min, t_max = t_window
    tt = torch.as_tensor(t, dtype=torch.float64)
    return bool(((tt >= t_min) & (tt <= t_max)).any())


class GradientGuidance(Denoiser):
    """Steer sampling down the gradient of a loss on x0_pred ("universal guidance", Bansal et al. 2023).

    At each call: x0_pred(x_t) with autograd on, L = loss_fn(x0_pred, **cond) summed over the batch,
    g = dL/dx_t (through the denoiser), and the guided prediction
        eps~ = eps + scale * weight(t) * sqrt(1 - abar) * g
        x0~  = x0_pred - scale * weight(t) * (1 - abar) / sqrt(abar) * g
    i.e. the score -eps / sqrt(1 - abar) gains -scale * weight(t) * g, the score of p(x_t) exp(-scale w L).
    Guidance is off (plain prediction, no gradient) at steps whose t is outside t_window = (t_min, t_max).
    weighting: "sqrt_abar" (weak at high noise, where x0_pred is a blur), "constant", "one_minus_abar",
    or a callable weight(t, abar) with abar shaped (B, 1, ..., 1).
    """

    def __init__(self, denoiser, loss_fn: Callable, scale: float, weighting="sqrt_abar",
                 t_window: tuple[float, float] | None = None):
        _require_denoiser(denoiser, "GradientGuidance")
        _check_window(t_window, "GradientGuidance")
        self.denoiser, self.loss_fn, self.scale = denoiser, loss_fn, float(scale)
        self.weight, self.t_window = _weighting_fn(weighting), t_window

    def __call__(self, x_t: torch.Tensor, t, abar, **cond) -> Prediction:
        if self.scale == 0 or not _in_window(t, self.t_window):
            return self.denoiser(x_t, t, abar, **cond)
        with _grad_context():
            x = x_t.detach().requires_grad_(True)
            pred = self.denoiser(x, t, abar, **cond)
            loss = self.loss_fn(pred.x0, **cond).sum()
            (grad,) = torch.autograd.grad(loss, x)
        abar_b = as_batch(abar, x_t)
        weight = torch.as_tensor(self.weight(t, abar_b), dtype=x_t.dtype, device=x_t.device)
        # eps~ = eps + scale * w(t) * sqrt(1 - abar) * grad_{x_t} L(x0_pred(x_t))   (Bansal et al. 2023, forward
        # universal guidance; the same gradient through x0_pred as DPS, Chung et al. 2023). In x terms a DDIM
        # step moves by -scale * w(t) * (...) * grad: the course's "x <- x - scale * grad * weight(t)".
        eps = pred.eps.detach() + self.scale * weight * (1 - abar_b).sqrt() * grad
        # keep x0 and eps consistent: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)   (DDPM eq. 4)
        return Prediction(x0_from_eps(x_t, eps, abar_b), eps)


def mean_intensity_loss(target: float | Sequence[float]) -> Callable:
    """A guide: squared distance of each sample's mean intensity (or per-channel means: a colour) to target.

    target a float: the mean over all non-batch dims; a sequence of C floats: per-channel means of
    (B, C, ...) images. Returns loss_fn(x0, **cond) -> (B,) for GradientGuidance.
    """
    def loss_fn(x0: torch.Tensor, **cond) -> torch.Tensor:
        tgt = torch.as_tensor(target, dtype=x0.dtype, device=x0.device)
        if tgt.ndim == 0:
            return (x0.reshape(x0.shape[0], -1).mean(1) - tgt) ** 2
        if x0.ndim < 2 or x0.shape[1] != tgt.numel():
            raise ValueError(f"colour target has {tgt.numel()} channels but x0 has shape {tuple(x0.shape)}; "
                             "give one value per channel (dim 1), or a single float.")
        means = x0.reshape(x0.shape[0], x0.shape[1], -1).mean(2)      # (B, C, ...) -> (B, C)
        return ((means - tgt) ** 2).sum(1)
    return loss_fn


def classifier_loss(classifier: Callable, target_class: int | torch.Tensor | None = None,
                    label_key: str = "class_labels") -> Callable:
    """A guide: cross-entropy of classifier(x0_pred, t=0) against target_class.

    classifier is any callable (x, t) -> logits (B, K), e.g. diffusekit.nn.NoiseAwareClassifier;
    it sees the clean estimate, so an ordinary (t = 0) classifier works. target_class None takes
    the labels from the sampling condition cond[label_key].
    """
    def loss_fn(x0: torch.Tensor, **cond) -> torch.Tensor:
        y = _labels(target_class, cond, label_key, x0)
        logits = classifier(x0, torch.zeros(x0.shape[0], device=x0.device))
        return F.cross_entropy(logits, y, reduction="none")
    return loss_fn


def _labels(target_class, cond: dict, label_key: str, x: torch.Tensor) -> torch.Tensor:
    if target_class is None:
        if label_key not in cond:
            raise ValueError(f"no target class: pass target_class=..., or sample with {label_key}=... "
                             f"(the condition has keys {sorted(cond)}).")
        target_class = cond[label_key]
    y = torch.as_tensor(target_class, dtype=torch.long, device=x.device)
    return y.expand(x.shape[0]) if y.ndim == 0 else y


# --- classifier guidance -------------------------------------------------------------------

class ClassifierGuidance(Denoiser):
    """Classifier guidance with a noise-aware classifier p(y | x_t, t) (Dhariwal & Nichol 2021, sec. 4).

    eps~ = eps - scale * sqrt(1 - abar) * grad_{x_t} log p(y | x_t, t); the same correction works for
    DDPM (Alg. 1, a mean shift) and DDIM (Alg. 2). classifier is any callable (x_t, t) -> logits with
    t a (B,) float tensor in training-timestep units. The labels are target_class, or cond[label_key].
    """

    def __init__(self, denoiser, classifier: Callable, scale: float,
                 target_class: int | torch.Tensor | None = None, label_key: str = "class_labels"):
        _require_denoiser(denoiser, "ClassifierGuidance")
        if not math.isfinite(float(scale)):
            raise ValueError(f"classifier guidance scale {scale!r} is not a finite number; give a finite scale "
                             f"such as 1 (0 = off).")
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.target_class, self.label_key = target_class, label_key

    def __call__(self, x_t: torch.Tensor, t, abar, **cond) -> Prediction:
        pred = self.denoiser(x_t, t, abar, **cond)
        if self.scale == 0:
            return pred
        y = _labels(self.target_class, cond, self.label_key, x_t)
        t_batch = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t_batch.ndim == 0:
            t_batch = t_batch.expand(x_t.shape[0])
        with _grad_context():
            x = x_t.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x, t_batch), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y].sum()
            (grad,) = torch.autograd.grad(selected, x)
        abar_b = as_batch(abar, x_t)
        # eps~ = eps - s * sqrt(1 - abar) * grad_{x_t} log p_phi(y | x_t)   (Dhariwal & Nichol 2021, Alg. 2)
        eps = pred.eps - self.scale * (1 - abar_b).sqrt() * grad.to(x_t.dtype)
        return Prediction(x0_from_eps(x_t, eps, abar_b), eps)


# --- the source's post-step rule and the stack of guides ------------------------------------

@dataclass(frozen=True)
class Guide:
    """A differentiable loss to steer sampling with: loss_fn(x, **cond) -> (B,), its scale and weighting.

    weighting "source" applies SourceGuidance (x <- x - scale sqrt(abar_t) grad L(x) after each step,
    with L on x itself); the other weightings apply GradientGuidance (an eps correction from the
    gradient of L on x0_pred). t_window = (t_min, t_max) limits the steps it acts on.
    """
    loss_fn: Callable
    scale: float
    weighting: str | Callable = "sqrt_abar"
    t_window: tuple[float, float] | None = None
    name: str = "guide"

    def __post_init__(self):
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"{self.name}: scale {self.scale!r} is not a finite number; give a finite scale "
                             f"such as 10 (0 = off).")
        _check_window(self.t_window, self.name)
        if not callable(self.weighting) and self.weighting not in GUIDE_WEIGHTINGS:
            raise ValueError(f"{self.name}: weighting={self.weighting!r}; choose one of {list(GUIDE_WEIGHTINGS)}.")


def brightness_guide(value: float, scale: float, weighting="sqrt_abar", t_window=None) -> Guide:
    """Pull each sample's mean intensity toward `value` (data units, e.g. [-1, 1])."""
    return Guide(mean_intensity_loss(float(value)), scale, weighting, t_window, name=f"brightness={value}")


def color_guide(rgb: Sequence[float], scale: float, weighting="sqrt_abar", t_window=None) -> Guide:
    """Pull each sample's per-channel means toward the colour `rgb` (data units, one value per channel)."""
    return Guide(mean_intensity_loss(list(rgb)), scale, weighting, t_window, name=f"color={tuple(rgb)}")


class SourceGuidance:
    """The source's guidance rule, exactly as written: after each sampler step,
        x <- x - scale * sqrt(abar_t) * grad_x L(x)
    with abar_t the noise level the model was called at in that step and L evaluated on x itself.

    Relation to the eps-space form (GradientGuidance, eps~ = eps + s' w(t) sqrt(1 - abar_t) g with
    g = grad_{x_t} L(x0_pred(x_t))): a DDIM step (eta = 0) from abar_t to abar_prev moves x_prev by
    d x_prev / d eps = sqrt(1 - abar_prev) - sqrt(abar_prev / abar_t) sqrt(1 - abar_t) =: -k_t per unit
    of eps, so the eps form moves x_prev by -s' w(t) sqrt(1 - abar_t) k_t g. For a loss with constant
    gradient G and x0_pred = x_t / sqrt(abar_t) (g = G / sqrt(abar_t)) the two rules agree when
        s' w(t) = s * abar_t / (sqrt(1 - abar_t) * k_t)            (see eps_scale_for_source)
    k_t shrinks with the step size, so at equal nominal scale the eps form is weaker by a factor
    that depends on the number of steps; tests/math/test_guidance.py checks the identity.
    """

    def __init__(self, guides: Sequence[Guide], schedule: NoiseSchedule):
        self.guides, self.schedule = list(guides), schedule

    def callback(self, cond: dict, then: Callable | None = None) -> Callable[[StepInfo], torch.Tensor]:
        """A per-step callback applying every guide (then `then`, e.g. a progress or record hook)."""
        def step(info: StepInfo):
            x = self.apply(info.x, info.t, cond)
            if then is not None:
                out = then(StepInfo(info.i, info.t, info.abar_next, x, info.x0_pred))
                x = x if out is None else out
            return x
        return step

    def apply(self, x: torch.Tensor, t: float, cond: dict) -> torch.Tensor:
        abar_t = float(self.schedule.alpha_bar_at(torch.tensor([float(t)], dtype=torch.float64))[0])
        for guide in self.guides:
            if guide.scale == 0 or not _in_window(t, guide.t_window):
                continue
            with _grad_context():
                xg = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(guide.loss_fn(xg, **cond).sum(), xg)
            # x <- x - s * sqrt(abar_t) * grad L(x)   (the source's rule)
            x = x.detach() - guide.scale * math.sqrt(abar_t) * grad
        return x


def eps_scale_for_source(scale: float, abar_t: float, abar_prev: float) -> float:
    """s' w(t) that makes one DDIM step of GradientGuidance equal SourceGuidance at `scale` (see its docstring)."""
    k = math.sqrt(abar_prev / abar_t) * math.sqrt(1 - abar_t) - math.sqrt(1 - abar_prev)
    return scale * abar_t / (math.sqrt(1 - abar_t) * k)


def guided_denoiser(denoiser: Denoiser, *, guidance_scale: float = 1.0, null_label: int = -1,
                    null_cond: dict | None = None, guides: Sequence[Guide] = (), classifier: Callable | None = None,
                    classifier_scale: float = 0.0, target_class=None) -> Denoiser:
    """Stack guidance around a Denoiser: classifier-free guidance (scale != 1), then each eps-space
    gradient guide, then classifier guidance. Source-weighted guides act after each step instead
    (SourceGuidance) and are skipped here."""
    out = denoiser
    if guidance_scale != 1.0:
        out = ClassifierFreeGuidance(out, guidance_scale, null_label=null_label, null_cond=null_cond)
    for guide in guides:
        if guide.weighting != "source":
            out = GradientGuidance(out, guide.loss_fn, guide.scale, guide.weighting, guide.t_window)
    if classifier is not None and classifier_scale != 0:
        out = ClassifierGuidance(out, classifier, classifier_scale, target_class=target_class)
    return out
