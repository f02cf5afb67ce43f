"""CLIP guidance for the sampling loop: guides (what scores an image), the cond_fn (how a score steers) and the
guidance settings (``conf/guidance/*.yaml`` instantiates one: its fields are the constructor's arguments).

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

from clipdiff.diffusion.schedule import predict_x0, to_eps
from clipdiff.errors import ClipdiffError

log = logging.getLogger(__name__)

FORMS = ("classifier", "dot")
MODES = ("eps", "mean_shift")


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
        if self.unet is not None:  # gradients through the UNet's prediction as well
            eps = to_eps(self.unet(x_t, t).sample, x_t, t, self.abar, self.prediction_type)
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


# -- the cond_fn --------------------------------------------------------------------------------------------------
class GuidedEps:
    """``cond_fn(x_t, t, eps, index) -> eps`` of the sampling loop (see the module doc for the math)."""

    def __init__(self, guide: nn.Module, targets: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float,
                 form: str = "classifier", mode: str = "eps", window: Sequence[float] = (0.0, 1.0), every: int = 1,
                 reuse_grad: bool = False, grad_clip: float | None = None, scheduler: Any = None):
        self.guide, self.targets, self.scale = guide, targets.long(), float(scale)
        self.form, self.mode, self.every, self.reuse_grad, self.grad_clip = form, mode, int(every), bool(reuse_grad), grad_clip
        self.window = (float(window[0]), float(window[1]))
        self.abar = alphas_cumprod.float().cpu()
        self.scheduler = scheduler
        self.num_train = len(self.abar)
        self._steps: tuple[list[int], dict[int, int]] | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (index, grad) of the last guided step
        self.guided_calls = 0
        self.stats: list[dict[str, float]] = []  # one entry per fresh gradient (see :meth:`record`)

    def reset(self) -> None:
        """Forget the previous sampling run (reused gradient, counters, statistics)."""
        self._last, self.guided_calls, self.stats = None, 0, []

    # which steps are guided
    def step_position(self, t: int) -> tuple[int, int]:
        """(i, n): this step's position in the sampler's timesteps (0 = noisiest); noise level when unknown."""
        ts = getattr(self.scheduler, "timesteps", None)
        if ts is not None and len(ts):
            if self._steps is None or len(self._steps[0]) != len(ts) or self._steps[0][0] != int(ts[0]):
                seq = [int(v) for v in ts]
                self._steps = (seq, {v: i for i, v in enumerate(seq)})
            if int(t) in self._steps[1]:
                return self._steps[1][int(t)], len(self._steps[0])
        return self.num_train - 1 - int(t), self.num_train

    def in_window(self, t: int) -> tuple[bool, bool]:
        """(inside the window, a step that computes a fresh gradient)."""
        i, n = self.step_position(t)
        start, stop = self.window
        inside = start <= i / n < stop
        return inside, inside and (i - math.ceil(start * n - 1e-9)) % self.every == 0

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
        return (self.scale * c).to(like.device, like.dtype)

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
                           "grad_rms": float(g.float().flatten(1).pow(2).mean(1).sqrt().mean()),
                           "eps_shift_rms": float(shift.float().flatten(1).pow(2).mean(1).sqrt().mean())})

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
        shift = self.coefficient(t, eps) * g.to(eps.dtype)
        if fresh:
            self.record(t, g, shift)
        return eps - shift


# -- settings: what conf/guidance/<kind>.yaml instantiates ---------------------------------------------------------
@dataclasses.dataclass
class Guidance:
    """How a guide steers (the module doc has the math); ``kind`` names the guide model it needs. The defaults of
    the subclasses are those of ``conf/guidance/<kind>.yaml`` (tests/test_guidance.py checks that they agree)."""

    kind: ClassVar[str] = ""
    scale: float = 1.0
    form: str = "classifier"
    mode: str = "eps"
    window: Sequence[float] = (0.0, 1.0)
    every: int = 1
    reuse_grad: bool = False
    grad_clip: float | None = None
    free_text: str = "warn"

    def check(self, prefix: str = "guidance", scheduler: Any = None) -> Guidance:
        """One ClipdiffError line naming ``<prefix>.<key>`` and the allowed values for the first bad option."""
        choices = {"form": FORMS, "mode": MODES, "free_text": ("warn", "error")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ClipdiffError(f"{prefix}.{key}={getattr(self, key)!r}: choose {' or '.join(allowed)}")
        if self.mode == "mean_shift" and scheduler is not None and not isinstance(scheduler, DDPMScheduler):
            raise ClipdiffError(f"{prefix}.mode=mean_shift shifts the ancestral DDPM mean: use sampler=ddpm "
                                f"(or {prefix}.mode=eps, which works with both samplers)")
        w = list(self.window) if isinstance(self.window, Sequence) else [self.window]
        if len(w) != 2 or not 0.0 <= float(w[0]) < float(w[1]) <= 1.0:
            raise ClipdiffError(f"{prefix}.window={w}: give [start, stop] fractions with 0 ≤ start < stop ≤ 1")
        if int(self.every) < 1:
            raise ClipdiffError(f"{prefix}.every={self.every} must be ≥ 1")
        if float(self.scale) < 0 or not math.isfinite(float(self.scale)):
            raise ClipdiffError(f"{prefix}.scale={self.scale} must be a finite number ≥ 0")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values, with the guide kind as ``name``."""
        return {"name": self.kind, **{k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in dataclasses.asdict(self).items()}}

    def guide(self, model: nn.Module, extra: Sequence[str], scheduler: Any, unet: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def cond_fn(self, model: nn.Module, targets: torch.Tensor, extra: Sequence[str], scheduler: Any,
                unet: nn.Module | None = None) -> GuidedEps:
        """The cond_fn steering every sample towards its caption id in ``targets`` (ids into the model's vocabulary
        followed by the ``extra`` free-text prompts) on the sampler ``scheduler``."""
        guide = self.guide(model, list(extra), scheduler, unet)
        return GuidedEps(guide, targets, scheduler.alphas_cumprod, self.scale, self.form, self.mode, tuple(self.window),
                         self.every, self.reuse_grad, self.grad_clip, scheduler)


@dataclasses.dataclass
class ClipGuidance(Guidance):
    """The clean CLIP through x0_hat; ``grad_through_eps`` backpropagates through the UNet as well."""

    kind: ClassVar[str] = "clip"
    scale: float = 30.0
    grad_clip: float | None = 0.05
    grad_through_eps: bool = False

    def guide(self, model, extra, scheduler, unet):
        if self.grad_through_eps and unet is None:
            raise ClipdiffError("guidance.grad_through_eps=true needs the DDPM's UNet")
        device = next(model.parameters()).device
        return CleanClipGuide(model, scheduler.alphas_cumprod, extra, unet if self.grad_through_eps else None,
                              scheduler.config.get("prediction_type", "epsilon")).to(device)


@dataclasses.dataclass
class NoisyClipGuidance(Guidance):
    """The noisy CLIP on (x_t, t)."""

    kind: ClassVar[str] = "noisy_clip"
    scale: float = 100.0

    def guide(self, model, extra, scheduler, unet):
        return NoisyClipGuide(model.eval().requires_grad_(False), extra)


GUIDANCE: dict[str, type[Guidance]] = {g.kind: g for g in (ClipGuidance, NoisyClipGuidance)}
