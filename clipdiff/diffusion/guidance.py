"""Guidance for the sampling loop: guides (what scores an image), the cond_fn (how a score steers; classifier-free
guidance too) and the guidance settings (``conf/guidance/*.yaml`` instantiates one: its fields are the constructor's
arguments).

Nothing here loads a checkpoint: guides take already-loaded models, and
:class:`clipdiff.pipelines.guided.GuidedPipeline` composes them with the DDPM (loads every export once, checks that
they fit, resolves the prompts). ``settings.check(prefix, scheduler)`` validates the option values (one line naming
``<prefix>.<key>`` and the allowed values) and ``settings.cond_fn(model, targets, extra, scheduler, unet)`` builds the
``cond_fn`` of :func:`clipdiff.diffusion.sampling.sample`; ``targets`` are caption ids into the guide's vocabulary
followed by ``extra`` free-text prompts.

The math, with ``ā_t = alphas_cumprod[t]`` and ``g = ∇_{x_t} log p(y | x_t)`` (summed over the batch, so each
sample gets the gradient of its own score):

- **score** (``form``): ``classifier`` = ``log_softmax(logits)[y]`` over the guide's captions (stops pushing once
  p(y)→1; default), ``dot`` = ``logits[y]`` = ``logit_scale · cos(f(x), T_y)`` (GLIDE-style, unbounded).
- **guides**: ``clip`` — the clean CLIP on ``x0_hat = (x_t − sqrt(1−ā_t)·eps)/sqrt(ā_t)`` mapped to [0, 1]
  (straight-through clamp: clamped forward, identity backward) and resized/normalised by the ClipClassifier.
  By default ``eps`` is the sampler's prediction, held constant (dx0_hat/dx_t = 1/sqrt(ā_t); one CLIP
  forward+backward per guided step); ``grad_through_eps: true`` re-runs the UNet with gradients (exact, ~3× dearer).
  ``noisy_clip`` — the noisy CLIP directly on ``(x_t, t)`` (no UNet in the gradient).
- **gradient hygiene**: NaN/inf entries set to 0, then each sample's gradient RMS clamped to ``grad_clip``.
- **application** (``mode``): ``eps`` = ``eps − s·sqrt(1−ā_t)·g`` (works for DDIM and DDPM);
  ``mean_shift`` (ancestral DDPM only) = ``μ + s·σ_t²·g`` written as the equivalent eps change
  ``eps − s·σ_t²·sqrt(α_t)·sqrt(1−ā_t)/β_t · g`` (α_t, β_t between this step and the previous one; exact while the
  scheduler's x0 clamp is inactive).
- **prompts** outside a guide's vocabulary (``free_text: warn``, the default): the prompt's text embedding is
  appended to the guide's captions with a warning, so the classifier form scores it against the vocabulary and
  the dot form uses it alone. The clean CLIP always has a text tower; a noisy CLIP needs one (``encode_text`` or
  ``clip.encode_text``), else such a prompt is an error. ``free_text: error`` makes it an error for both.
- **x0 clamp**: the sampler steps every method, guided or not, with the eps consistent with its clamped x0_hat
  (:func:`clipdiff.diffusion.sampling.step_options`), so the clamp cannot turn the update against the guidance and a
  scale → 0 gives the unguided samples.
- **when**: the step ``i`` of ``n`` (0 = noisiest) is guided iff ``start ≤ i/n < stop`` (``window``) and
  ``(i − first) % every == 0``; with ``reuse_grad`` the skipped steps of the window reuse the last gradient.

Classifier-free guidance (``cfg``; Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") needs the conditional
DDPM (``model=ddpm_cond``) and no guide model: the sampling loop calls the UNet on the null condition and
:class:`CfgEps` calls it once more with each sample's caption id, then

    eps = eps_null + w·(eps_cond − eps_null)

(w = 0: the null-condition samples, w = 1: the conditional ones, w > 1: pushed further along eps_cond − eps_null).
The combination is linear, so it is the same in whatever space the model predicts: v-prediction's eps =
sqrt(ā_t)·v + sqrt(1−ā_t)·x_t is affine in v and the weights (1 − w) + w sum to 1, so combining the v is combining
the eps. It is done on the model's outputs (v or eps), which is exact where the eps round trip is not. With a
conditional DDPM every other method (unguided, ``clip``, ``noisy_clip``) samples on the null condition;
``cfg_noisy_clip`` takes the cfg eps and then adds the noisy-CLIP gradient term exactly as ``noisy_clip`` does
(``scale`` is the noisy-CLIP scale s, ``cfg_scale`` the cfg weight w).

Options of every method, off by default (the defaults reproduce the plain samples bit for bit):

- ``schedule``: the scale as a function of the noise level τ = t/(T−1) (1 = noisiest), ``constant`` (1), ``linear``
  (2·(1−τ)) or ``cosine`` (1 + cos(π·τ)): both rise from 0 at pure noise to 2 at t = 0 and average 1 over τ, so a
  scale means the same total push. Wang et al. 2024 ("Analysis of Classifier-Free Guidance Weight Schedulers",
  TMLR) found that such monotonically increasing schedules beat a constant weight (guidance conflicts most with the
  generative term at high noise). The gradient term is scaled by it (s·m(τ)); the cfg weight by 1 + (w − 1)·m(τ),
  so w = 1 stays the conditional model.
- ``recurrence`` k: universal guidance's self-recurrence (Bansal et al. 2023, "Universal Guidance for Diffusion
  Models"): each guided step is taken k times, x_t re-drawn from q(x_t | x_{t−1}) in between
  (:func:`clipdiff.diffusion.sampling.renoise`); k = 1 is the plain step.
- ``normalize`` (gradient methods, ``mode: eps``): norm-based scaling (Kim et al. 2022, "Guided-TTS", which scales
  the classifier gradient in proportion to the norm of the score, ‖eps‖/sqrt(1−ā_t)): the eps change becomes
  ``scale·m(τ)·‖eps‖`` along g per sample, a fixed fraction of the eps norm whatever the guide's gradient magnitude;
  ``scale`` then means that fraction (e.g. 0.1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import DDPMScheduler
from torch import nn

from clipdiff.diffusion.schedule import output_change_as_eps, predict_x0, to_eps
from clipdiff.errors import ClipdiffError

log = logging.getLogger(__name__)

FORMS = ("classifier", "dot")
MODES = ("eps", "mean_shift")
SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(schedule: str, t: int, num_train: int) -> float:
    """The scale multiplier m(τ) at timestep ``t`` of ``num_train``, τ = t/(T−1) (see the module doc)."""
    if schedule == "constant":
        return 1.0
    tau = float(t) / max(int(num_train) - 1, 1)
    if schedule == "linear":
        return 2.0 * (1.0 - tau)
    if schedule == "cosine":
        return 1.0 + math.cos(math.pi * tau)
    raise ClipdiffError(f"guidance.schedule={schedule!r}: choose {' or '.join(SCHEDULES)}")


# -- guides: [B, K] caption logits of x_t, differentiable w.r.t. x_t -------------------------------------------
class CleanClipGuide(nn.Module):
    """The clean CLIP on the predicted x_0. ``captions`` = the CLIP's vocabulary + appended free-text prompts."""

    kind = "clip"

    def __init__(self, clf: nn.Module, alphas_cumprod: torch.Tensor, extra_captions: Sequence[str] = (),
                 unet: nn.Module | None = None, prediction_type: str = "epsilon"):
        super().__init__()
        self.clf = clf
        self.captions = list(clf.vocabulary) + list(extra_captions)
        self.unet, self.prediction_type = unet, prediction_type
        self.register_buffer("abar", alphas_cumprod.float().clone(), persistent=False)
        text = clf.get_text_features()
        if extra_captions:
            with torch.no_grad():
                text = torch.cat([text, clf.encode_text(list(extra_captions)).to(text)])
        self.register_buffer("text", text.detach(), persistent=False)

    def image_logits(self, x01: torch.Tensor) -> torch.Tensor:
        return self.clf.logit_scale * self.clf.encode_image(x01) @ self.text.T

    def logits(self, x_t: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        if self.unet is not None:  # gradients through the UNet's prediction as well (a conditional one: its null id)
            eps = to_eps(call_unet(self.unet, x_t, t), x_t, t, self.abar, self.prediction_type)
        x0 = predict_x0(x_t, eps, t, self.abar)
        x0 = x0 + (x0.clamp(-1, 1) - x0).detach()  # straight-through clamp
        return self.image_logits((x0 + 1) / 2)

    @torch.no_grad()
    def final_logits(self, x01: torch.Tensor) -> torch.Tensor:
        """Logits of finished samples (images in [0, 1]): the guide's own reading of its result."""
        return self.image_logits(x01)


class NoisyClipGuide(nn.Module):
    """The noisy CLIP on (x_t, t). ``captions`` = its vocabulary + appended free-text prompts (only for a model
    with a text tower: ``encode_text`` or ``clip.encode_text``, and ``logit_scale``)."""

    kind = "noisy_clip"

    def __init__(self, model: nn.Module, extra_captions: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.captions = list(model.vocabulary) + list(extra_captions)
        self.text = None
        if extra_captions:
            with torch.no_grad():
                extra = text_encoder(model)(list(extra_captions))
            self.text = torch.cat([model.text_features, extra.to(model.text_features)]).detach()

    def logits(self, x_t: torch.Tensor, t: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        t_b = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        if self.text is None:
            return self.model.logits(x_t, t_b)
        return self.model.logit_scale * self.model.encode_image(x_t, t_b) @ self.text.to(x_t.device).T

    @torch.no_grad()
    def final_logits(self, x01: torch.Tensor) -> torch.Tensor:
        return self.logits(x01 * 2 - 1, 0)


def call_unet(unet: nn.Module, x_t: torch.Tensor, t: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's output on x_t; a conditional UNet gets ``labels`` (default: its null id, unconditional)."""
    from clipdiff.diffusion.sampling import null_label

    null = null_label(unet)
    if null is None:
        return unet(x_t, t).sample
    if labels is None:
        labels = torch.full((x_t.shape[0],), null, dtype=torch.long, device=x_t.device)
    return unet(x_t, t, class_labels=labels).sample


def text_encoder(model: nn.Module):
    """The free-text encoder of a guide model (``encode_text`` or ``clip.encode_text``), or None."""
    enc = getattr(model, "encode_text", None) or getattr(getattr(model, "clip", None), "encode_text", None)
    return enc if enc is not None and hasattr(model, "logit_scale") else None


def score(logits: torch.Tensor, target: torch.Tensor, form: str) -> torch.Tensor:
    """Per-sample guidance score [B]: log p(y|x) (classifier) or the raw logit logit_scale·cos (dot)."""
    if form == "classifier":
        logits = logits.float().log_softmax(dim=1)
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def clean_grad(grad: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """NaN/inf → 0, then each sample's RMS clamped to ``grad_clip`` (None: no clamp)."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grad_clip is not None:
        rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().view(-1, *([1] * (grad.ndim - 1)))
        grad = grad * (float(grad_clip) / rms.clamp_min(1e-12)).clamp(max=1.0)
    return grad


# -- the cond_fns -------------------------------------------------------------------------------------------------
def _position(scheduler: Any, num_train: int, cache: list, t: int) -> tuple[int, int]:
    """(i, n): step ``t``'s position in the sampler's timesteps (0 = noisiest); its noise level when unknown."""
    ts = getattr(scheduler, "timesteps", None)
    if ts is not None and len(ts):
        if not cache or len(cache[0]) != len(ts) or cache[0][0] != int(ts[0]):
            seq = [int(v) for v in ts]
            cache[:] = [seq, {v: i for i, v in enumerate(seq)}]
        if int(t) in cache[1]:
            return cache[1][int(t)], len(cache[0])
    return num_train - 1 - int(t), num_train


def _rms(x: torch.Tensor) -> float:
    """The batch mean of each sample's RMS."""
    return float(x.float().flatten(1).pow(2).mean(1).sqrt().mean())


class GuidedEps:
    """``cond_fn(x_t, t, eps, index) -> eps`` of the sampling loop (see the module doc for the math)."""

    def __init__(self, guide: nn.Module, targets: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float,
                 form: str = "classifier", mode: str = "eps", window: Sequence[float] = (0.0, 1.0), every: int = 1,
                 reuse_grad: bool = False, grad_clip: float | None = None, scheduler: Any = None,
                 schedule: str = "constant", recurrence: int = 1, normalize: bool = False):
        self.guide, self.targets, self.scale = guide, targets.long(), float(scale)
        self.form, self.mode, self.every, self.reuse_grad, self.grad_clip = form, mode, int(every), bool(reuse_grad), grad_clip
        self.window = (float(window[0]), float(window[1]))
        self.schedule, self.recurrence, self.normalize = schedule, int(recurrence), bool(normalize)
        self.abar = alphas_cumprod.float().cpu()
        self.scheduler = scheduler
        self.num_train = len(self.abar)
        self._steps: list = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (index, grad) of the last guided step
        self.guided_calls = 0
        self.stats: list[dict[str, float]] = []  # one entry per fresh gradient (see :meth:`record`)

    def reset(self) -> None:
        """Forget the previous sampling run (reused gradient, counters, statistics)."""
        self._last, self.guided_calls, self.stats = None, 0, []

    # which steps are guided
    def step_position(self, t: int) -> tuple[int, int]:
        """(i, n): this step's position in the sampler's timesteps (0 = noisiest); noise level when unknown."""
        return _position(self.scheduler, self.num_train, self._steps, t)

    def in_window(self, t: int) -> tuple[bool, bool]:
        """(inside the window, a step that computes a fresh gradient)."""
        i, n = self.step_position(t)
        start, stop = self.window
        inside = start <= i / n < stop
        return inside, inside and (i - math.ceil(start * n - 1e-9)) % self.every == 0

    def recurrence_at(self, t: int) -> int:
        """How many times the sampling loop takes step ``t`` (self-recurrence on the steps this guidance moves)."""
        return self.recurrence if self.scale != 0.0 and self.in_window(t)[0] else 1

    # the coefficient in front of g
    def coefficient(self, t: int, like: torch.Tensor) -> torch.Tensor:
        abar_t = self.abar[int(t)]
        if self.mode == "eps":
            c = (1 - abar_t).sqrt()
        else:
            prev = int(self.scheduler.previous_timestep(int(t)))
            abar_prev = self.abar[prev] if prev >= 0 else torch.tensor(1.0)
            alpha, beta = abar_t / abar_prev, 1 - abar_t / abar_prev
            var = beta if self.scheduler.config.variance_type == "fixed_large" else beta * (1 - abar_prev) / (1 - abar_t)
            c = var * alpha.sqrt() * (1 - abar_t).sqrt() / beta.clamp_min(1e-20)
        # constant schedule: scale * 1.0 is scale exactly, so the samples are those without a schedule
        return (self.scale * schedule_factor(self.schedule, t, self.num_train) * c).to(like.device, like.dtype)

    def shift(self, t: int, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The change subtracted from eps: coefficient·g, or with ``normalize`` s·m(τ)·‖eps‖·g/‖g‖ per sample."""
        if not self.normalize:
            return self.coefficient(t, eps) * g.to(eps.dtype)
        view = (-1, *([1] * (g.ndim - 1)))
        ratio = eps.float().flatten(1).norm(dim=1) / g.float().flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = self.scale * schedule_factor(self.schedule, t, self.num_train)
        return (factor * ratio.view(view) * g.float()).to(eps.dtype)

    def grad(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """∇_{x_t} of each sample's score (cleaned), float [B, 3, H, W]."""
        target = self.targets.to(x_t.device)[index]
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            s = score(self.guide.logits(x, t, eps.detach().float()), target, self.form)
            (g,) = torch.autograd.grad(s.sum(), x)
        self._score = s.detach()
        return clean_grad(g, self.grad_clip)

    def record(self, t: int, g: torch.Tensor, shift: torch.Tensor) -> None:
        """Per-step statistics of a fresh gradient (batch means): the step, the target's score before the step,
        the cleaned gradient's RMS and the RMS of the change made to eps (read only; the samples do not change)."""
        i, n = self.step_position(t)
        self.stats.append({"t": int(t), "step": i, "steps": n, "score": float(self._score.float().mean()),
                           "grad_rms": _rms(g), "eps_shift_rms": _rms(shift)})

    def __call__(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.scale == 0.0:
            return eps
        inside, fresh = self.in_window(t)
        if not inside:
            return eps
        if fresh:
            g = self.grad(x_t, t, eps, index)
            self.guided_calls += 1
            if self.reuse_grad:
                self._last = (index.detach().clone(), g)
        elif self.reuse_grad and self._last is not None and torch.equal(self._last[0], index):
            g = self._last[1]
        else:
            return eps
        shift = self.shift(t, g, eps)
        if fresh:
            self.record(t, g, shift)
        return eps - shift


class CfgEps:
    """Classifier-free guidance as a cond_fn. The loop's UNet call is on the null id; :meth:`output` (which the loop
    applies first, in the model's own output space) calls the UNet with each sample's caption id (``classes``,
    indexed like the loop's ``index``) and returns ``out_null + w_t·(out_cond − out_null)``, w_t = 1 + (w − 1)·m(τ):
    in eps, ``eps_null + w_t·(eps_cond − eps_null)`` (the map between v and eps is affine with weights summing to 1).
    Combining the outputs rather than their eps keeps w = 1 the conditional output up to one rounding: at high noise
    eps = sqrt(ā_t)·v + sqrt(1−ā_t)·x_t would round most of v away. :meth:`__call__` (eps space) then applies
    ``then``, a gradient guide on the cfg eps (``cfg_noisy_clip``), whose guide, targets and reading of the samples
    this one reports.

    ``stats`` has one entry per step: ``grad_rms`` = RMS of eps_cond − eps_null (the cfg direction; the guide's
    gradient RMS when ``then`` guided this step, with its ``score``), ``eps_shift_rms`` = RMS of the whole change of
    eps (cfg and gradient term)."""

    def __init__(self, unet: nn.Module, classes: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float,
                 prediction_type: str = "epsilon", scheduler: Any = None, schedule: str = "constant",
                 recurrence: int = 1, then: GuidedEps | None = None):
        self.unet, self.classes, self.scale = unet, classes.long(), float(scale)
        self.abar = alphas_cumprod.float().cpu()
        self.prediction_type, self.scheduler, self.schedule = prediction_type, scheduler, schedule
        self.recurrence, self.then = int(recurrence), then
        self.num_train = len(self.abar)
        self._steps: list = []
        self._pending: dict[str, Any] | None = None  # this step's cfg part, until __call__ adds the gradient term
        self.guided_calls = 0
        self.stats: list[dict[str, float]] = []

    @property
    def guide(self) -> nn.Module | None:
        return self.then.guide if self.then is not None else None

    @property
    def targets(self) -> torch.Tensor:
        """Ids into the captions the pipeline reports: the guide's (``then``), else the DDPM's vocabulary."""
        return self.then.targets if self.then is not None else self.classes

    def reset(self) -> None:
        self.guided_calls, self.stats, self._pending = 0, [], None
        if self.then is not None:
            self.then.reset()

    def recurrence_at(self, t: int) -> int:
        return self.recurrence  # cfg moves every step

    def weight(self, t: int) -> float:
        """w_t = 1 + (w − 1)·m(τ): the constant schedule gives w itself."""
        m = schedule_factor(self.schedule, t, self.num_train)
        return self.scale if m == 1.0 else 1.0 + (self.scale - 1.0) * m

    def output(self, x_t: torch.Tensor, t: int, out_null: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The guided model output from the null-condition one (the sampling loop calls this before ``__call__``)."""
        labels = self.classes.to(x_t.device)[index]
        direction = call_unet(self.unet, x_t, t, labels).to(out_null.dtype) - out_null
        out = out_null + self.weight(t) * direction
        as_eps = output_change_as_eps(direction, t, self.abar, self.prediction_type)
        self._pending = {"t": int(t), "direction": as_eps, "shift": output_change_as_eps(out - out_null, t, self.abar,
                                                                                         self.prediction_type)}
        self.guided_calls += 1
        return out

    def __call__(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The eps stage: ``eps`` is already the cfg eps (:meth:`output`); the gradient guide ``then`` adds to it."""
        pending, self._pending = self._pending, None
        if pending is None or pending["t"] != int(t):
            raise RuntimeError("CfgEps: the sampling loop must call output() before the eps stage of each step")
        before = len(self.then.stats) if self.then is not None else 0
        out = self.then(x_t, t, eps, index) if self.then is not None else eps
        i, n = _position(self.scheduler, self.num_train, self._steps, t)
        entry = {"t": int(t), "step": i, "steps": n, "score": math.nan, "grad_rms": _rms(pending["direction"]),
                 "eps_shift_rms": _rms(pending["shift"] + (out - eps))}
        if self.then is not None and len(self.then.stats) > before:  # the gradient guide took this step too
            mine = self.then.stats.pop()
            entry |= {"score": mine["score"], "grad_rms": mine["grad_rms"]}
        self.stats.append(entry)
        return out


# -- settings: what conf/guidance/<kind>.yaml instantiates ---------------------------------------------------------
@dataclasses.dataclass
class Guidance:
    """How a method steers (the module doc has the math). ``kind`` is the method's name, ``guide_kind`` the guide
    model it needs (None: none), ``conditional`` whether it needs the conditional DDPM. The defaults of the
    subclasses are those of ``conf/guidance/<kind>.yaml`` (tests/test_guidance.py checks that they agree)."""

    kind: ClassVar[str] = ""
    guide_kind: ClassVar[str | None] = None
    conditional: ClassVar[bool] = False
    scale: float = 1.0
    schedule: str = "constant"
    recurrence: int = 1

    def check(self, prefix: str = "guidance", scheduler: Any = None) -> Guidance:
        """One ClipdiffError line naming ``<prefix>.<key>`` and the allowed values for the first bad option."""
        if self.schedule not in SCHEDULES:
            raise ClipdiffError(f"{prefix}.schedule={self.schedule!r}: choose {' or '.join(SCHEDULES)}")
        if isinstance(self.recurrence, bool) or not isinstance(self.recurrence, int) or self.recurrence < 1:
            raise ClipdiffError(f"{prefix}.recurrence={self.recurrence!r} must be a whole number ≥ 1 (1: no repeat)")
        if not isinstance(self.scale, (int, float)) or float(self.scale) < 0 or not math.isfinite(float(self.scale)):
            raise ClipdiffError(f"{prefix}.scale={self.scale} must be a finite number ≥ 0")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values, with the method as ``name``."""
        return {"name": self.kind, **{k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in dataclasses.asdict(self).items()}}


@dataclasses.dataclass
class GradientGuidance(Guidance):
    """Guidance by a guide model's gradient (``clip``, ``noisy_clip``): the options of the module doc."""

    form: str = "classifier"
    mode: str = "eps"
    window: Sequence[float] = (0.0, 1.0)
    every: int = 1
    reuse_grad: bool = False
    grad_clip: float | None = None
    free_text: str = "warn"
    normalize: bool = False

    def check(self, prefix: str = "guidance", scheduler: Any = None) -> GradientGuidance:
        choices = {"form": FORMS, "mode": MODES, "free_text": ("warn", "error")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ClipdiffError(f"{prefix}.{key}={getattr(self, key)!r}: choose {' or '.join(allowed)}")
        if self.mode == "mean_shift" and scheduler is not None and not isinstance(scheduler, DDPMScheduler):
            raise ClipdiffError(f"{prefix}.mode=mean_shift shifts the ancestral DDPM mean: use sampler=ddpm "
                                f"(or {prefix}.mode=eps, which works with both samplers)")
        if self.normalize and self.mode != "eps":
            raise ClipdiffError(f"{prefix}.normalize=true sets the eps change directly: use {prefix}.mode=eps")
        w = list(self.window) if isinstance(self.window, Sequence) else [self.window]
        if len(w) != 2 or not 0.0 <= float(w[0]) < float(w[1]) <= 1.0:
            raise ClipdiffError(f"{prefix}.window={w}: give [start, stop] fractions with 0 ≤ start < stop ≤ 1")
        if int(self.every) < 1:
            raise ClipdiffError(f"{prefix}.every={self.every} must be ≥ 1")
        super().check(prefix, scheduler)
        return self

    def guide(self, model: nn.Module, extra: Sequence[str], scheduler: Any, unet: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def cond_fn(self, model: nn.Module, targets: torch.Tensor, extra: Sequence[str], scheduler: Any,
                unet: nn.Module | None = None) -> GuidedEps:
        """The cond_fn steering every sample towards its caption id in ``targets`` (ids into the model's vocabulary
        followed by the ``extra`` free-text prompts) on the sampler ``scheduler``."""
        guide = self.guide(model, list(extra), scheduler, unet)
        return GuidedEps(guide, targets, scheduler.alphas_cumprod, self.scale, self.form, self.mode, tuple(self.window),
                         self.every, self.reuse_grad, self.grad_clip, scheduler, self.schedule, self.recurrence,
                         self.normalize)


@dataclasses.dataclass
class ClipGuidance(GradientGuidance):
    """The clean CLIP through x0_hat; ``grad_through_eps`` backpropagates through the UNet as well."""

    kind: ClassVar[str] = "clip"
    guide_kind: ClassVar[str | None] = "clip"
    scale: float = 3.0
    grad_clip: float | None = 0.05
    grad_through_eps: bool = False

    def guide(self, model, extra, scheduler, unet):
        if self.grad_through_eps and unet is None:
            raise ClipdiffError("guidance.grad_through_eps=true needs the DDPM's UNet")
        device = next(model.parameters()).device
        return CleanClipGuide(model, scheduler.alphas_cumprod, extra, unet if self.grad_through_eps else None,
                              scheduler.config.get("prediction_type", "epsilon")).to(device)


@dataclasses.dataclass
class NoisyClipGuidance(GradientGuidance):
    """The noisy CLIP on (x_t, t)."""

    kind: ClassVar[str] = "noisy_clip"
    guide_kind: ClassVar[str | None] = "noisy_clip"
    scale: float = 10.0
    recurrence: int = 2

    def guide(self, model, extra, scheduler, unet):
        return NoisyClipGuide(model.eval().requires_grad_(False), extra)


def _cfg_eps(unet: nn.Module, classes: torch.Tensor, scheduler: Any, w: float, schedule: str, recurrence: int,
             then: GuidedEps | None = None) -> CfgEps:
    return CfgEps(unet, classes, scheduler.alphas_cumprod, w, scheduler.config.get("prediction_type", "epsilon"),
                  scheduler, schedule, recurrence, then)


@dataclasses.dataclass
class CfgGuidance(Guidance):
    """Classifier-free guidance with weight ``scale`` = w (the conditional DDPM; no guide model)."""

    kind: ClassVar[str] = "cfg"
    conditional: ClassVar[bool] = True
    scale: float = 2.0

    def cfg_fn(self, unet: nn.Module, classes: torch.Tensor, scheduler: Any, then: GuidedEps | None = None) -> CfgEps:
        """The cond_fn: ``classes`` are each sample's caption ids into the conditional DDPM's vocabulary."""
        return _cfg_eps(unet, classes, scheduler, self.scale, self.schedule, self.recurrence, then)


@dataclasses.dataclass
class CfgNoisyClipGuidance(NoisyClipGuidance):
    """Classifier-free guidance with weight ``cfg_scale``, then the noisy-CLIP gradient term with ``scale`` (as
    ``noisy_clip``; ``recurrence`` and ``schedule`` act on both terms)."""

    kind: ClassVar[str] = "cfg_noisy_clip"
    conditional: ClassVar[bool] = True
    scale: float = 3.0
    recurrence: int = 1
    cfg_scale: float = 3.0

    def check(self, prefix: str = "guidance", scheduler: Any = None) -> CfgNoisyClipGuidance:
        super().check(prefix, scheduler)
        c = self.cfg_scale
        if not isinstance(c, (int, float)) or isinstance(c, bool) or float(c) < 0 or not math.isfinite(float(c)):
            raise ClipdiffError(f"{prefix}.cfg_scale={c} must be a finite number ≥ 0")
        return self

    def cfg_fn(self, unet: nn.Module, classes: torch.Tensor, scheduler: Any, then: GuidedEps | None = None) -> CfgEps:
        """The cfg cond_fn with weight ``cfg_scale``, followed by ``then`` (this method's noisy-CLIP cond_fn)."""
        return _cfg_eps(unet, classes, scheduler, self.cfg_scale, self.schedule, self.recurrence, then)


GUIDANCE: dict[str, type[Guidance]] = {g.kind: g for g in (ClipGuidance, NoisyClipGuidance, CfgGuidance,
                                                            CfgNoisyClipGuidance)}
GUIDE_KINDS = ("clip", "noisy_clip")  # the guide models (exports) a method can need
