"""``GuidedPipeline``: a trained DDPM and its guides, loaded once and checked once, that draws (guided) images.

    pipe = GuidedPipeline.from_exports(ddpm="outputs/demo/ddpm/export.pt",
                                       guides={"noisy_clip": "outputs/demo/noisy_clip/export.pt"})
    out = pipe("a red car", method="noisy_clip", num_samples=4, sampler="ddim_stochastic", steps=25, seed=0)
    out.images                 # float [4, 3, H, W] in [0, 1]; out.pil() for PIL images

``guides`` maps a guide kind (``clip``: a clean CLIP export, ``noisy_clip``: a noisy CLIP export) to its export.
A conditional DDPM export (``model=ddpm_cond``) brings its caption vocabulary and adds the methods ``cfg``
(classifier-free guidance, no guide) and ``cfg_noisy_clip`` (with a noisy CLIP); the other methods then sample on
its null condition. ``cfg`` with an unconditional DDPM is one line of error.
Loading checks each export's kind and, against the DDPM, the noise schedule and image size of a noisy CLIP: one
ClipdiffError line each, naming the config key the path came from (``keys``). A call checks the option values and
the prompts before the first step (:meth:`prepare`), then samples (:meth:`draw`): the same seed, settings and batch
size give the same images. ``python -m clipdiff.sample``, ``clipdiff.evaluate`` and the sampling benchmark call it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipdiff.diffusion.guidance import GUIDANCE, GUIDE_KINDS, CfgEps, Guidance, GuidedEps, text_encoder
from clipdiff.diffusion.sampling import Sampler, null_label, sample
from clipdiff.diffusion.schedule import check_compatible
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.clip import load_clip
from clipdiff.models.components.noisy_clip import load_noisy_clip
from clipdiff.models.components.unet import load_ddpm
from clipdiff.pipelines import prompts as prompt_text

log = logging.getLogger(__name__)

LOADERS = {"clip": load_clip, "noisy_clip": load_noisy_clip}
WHAT = {"clip": "CLIP", "noisy_clip": "noisy CLIP"}


def pick_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` …; an absent CUDA device is one line."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ClipdiffError(f"device={name} but no CUDA device is available (use device=cpu)")
    return torch.device(name)


@dataclasses.dataclass
class GuidedOutput:
    """What one call drew: ``images`` (float [N, 3, H, W] in [0, 1], CPU) and what a report reads beside them."""

    images: torch.Tensor
    method: str
    prompts: list[str] | None  # each sample's caption as matched (a vocabulary caption or normalised free text)
    captions: list[str]  # the guide's captions: its vocabulary, then free-text prompts ([] unguided; cfg: the DDPM's)
    targets: torch.Tensor | None  # each sample's id into ``captions``
    guide_logits: torch.Tensor | None  # [N, len(captions)]: the guide's own reading of the finished samples
    steps: list[dict[str, float]]  # per guided step: t, score, gradient RMS, eps shift RMS (GuidedEps.record)
    seconds: float  # the sampling loop alone
    settings: dict[str, Any]  # guidance (with ``name``) and sampler, as plain values

    @property
    def guided_steps(self) -> int:
        return len(self.steps)

    def guide_correct(self) -> torch.Tensor | None:
        """Per sample: does the guide's top caption equal its target? (None unguided or unscored)"""
        return None if self.guide_logits is None else self.guide_logits.argmax(1) == self.targets

    def pil(self) -> list:
        from PIL import Image

        arr = self.images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]


@dataclasses.dataclass
class Prepared:
    """A checked call, ready to draw: everything is validated and built, nothing is sampled yet."""

    method: str
    num_samples: int
    sampler: Sampler
    scheduler: Any
    guidance: Guidance | None
    cond: GuidedEps | CfgEps | None
    prompts: list[str] | None
    captions: list[str]
    seed: int
    batch_size: int


class GuidedPipeline:
    """A DDPM (``unet`` + its training ``schedule``; ``vocabulary``: a conditional DDPM's captions, id i = caption i)
    and loaded guide models by kind; see the module doc."""

    def __init__(self, unet: nn.Module, schedule: Mapping[str, Any], guides: Mapping[str, nn.Module] | None = None,
                 *, keys: Mapping[str, str] | None = None, vocabulary: Sequence[str] | None = None):
        self.unet, self.schedule = unet, dict(schedule)
        self.keys = {"ddpm": "ddpm_ckpt", **{k: f"{k}_ckpt" for k in GUIDE_KINDS}, **(keys or {})}
        self.image_size = int(unet.config.sample_size)
        null = null_label(unet)
        self.vocabulary = list(vocabulary) if vocabulary else None
        if null is not None and (self.vocabulary is None or len(self.vocabulary) != null):
            raise ClipdiffError(f"{self.keys['ddpm']}: a conditional DDPM with {null} captions + the null id needs "
                                f"its caption vocabulary ({0 if self.vocabulary is None else len(self.vocabulary)} given)")
        if null is None and self.vocabulary is not None:
            raise ClipdiffError(f"{self.keys['ddpm']}: a caption vocabulary was given for an unconditional DDPM")
        self.guides: dict[str, nn.Module] = {}
        for kind, model in (guides or {}).items():
            self.check_guide(kind, model)
            self.guides[kind] = model

    @classmethod
    def from_exports(cls, ddpm: str | Path, guides: Mapping[str, str | Path] | None = None, *,
                     device: str | torch.device = "cpu", keys: Mapping[str, str] | None = None) -> GuidedPipeline:
        """Load the DDPM export and each guide export once; ``keys`` names the config key of each path in errors
        (defaults: ``ddpm_ckpt``, ``clip_ckpt``, ``noisy_clip_ckpt``)."""
        keys = {"ddpm": "ddpm_ckpt", **{k: f"{k}_ckpt" for k in GUIDE_KINDS}, **(keys or {})}
        unknown = sorted(set(guides or {}) - set(LOADERS))
        if unknown:
            raise ClipdiffError(f"guides: no guide kind {unknown[0]!r} (choose {' or '.join(LOADERS)})")
        device = pick_device(device)
        unet, schedule, vocabulary = load_ddpm(ddpm, key=keys["ddpm"], device=device, with_vocabulary=True)
        loaded = {kind: LOADERS[kind](path, key=keys[kind], device=device) for kind, path in (guides or {}).items()}
        return cls(unet, schedule, loaded, keys=keys, vocabulary=vocabulary)

    @property
    def conditional(self) -> bool:
        """Whether the DDPM is conditioned on the caption id (``model=ddpm_cond``): ``cfg`` needs it."""
        return self.vocabulary is not None

    @property
    def methods(self) -> list[str]:
        """The methods this pipeline can draw: ``none`` and each method whose guide (and DDPM) it has."""
        return ["none", *(m for m, g in GUIDANCE.items() if (g.guide_kind is None or g.guide_kind in self.guides)
                          and (self.conditional or not g.conditional))]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def check_guide(self, kind: str, model: nn.Module) -> None:
        """A guide fits the DDPM: a known kind, a vocabulary; a noisy CLIP shares the noise schedule and image size."""
        if kind not in GUIDE_KINDS:
            raise ClipdiffError(f"guides: no guide kind {kind!r} (choose {' or '.join(GUIDE_KINDS)})")
        key = self.keys[kind]
        if not list(getattr(model, "vocabulary", []) or []):
            raise ClipdiffError(f"{key}: the {WHAT[kind]} has no caption vocabulary to guide towards")
        size = int(model.image_size)
        if kind == "noisy_clip":
            check_compatible(self.schedule, model.schedule, names=(self.keys["ddpm"], key))
            if size != self.image_size:
                raise ClipdiffError(
                    f"{key}: the noisy CLIP reads {size} px x_t but the DDPM makes {self.image_size} px images; x_t "
                    f"cannot be resized without changing its noise, so train the noisy CLIP at "
                    f"data.image_size={self.image_size}")
        elif size != self.image_size:
            log.info("the clean CLIP reads %d px images; x0_hat (%d px) is resized for it", size, self.image_size)

    # -- a call -----------------------------------------------------------------------------------------------
    def prepare(self, prompts: str | Sequence[str] | None = None, *, method: str | None = None,
                guidance: Guidance | None = None, scale: float | None = None, num_samples: int | None = None,
                sampler: Sampler | str = "ddim_stochastic", steps: int | None = None, seed: int = 0, batch_size: int = 64,
                prefix: str = "guidance") -> Prepared:
        """Check every option and prompt and build the cond_fn; ``prefix`` is the config path named in errors."""
        method = method or (guidance.kind if guidance is not None else "none")
        wanted = GUIDANCE.get(method)
        if wanted is not None and wanted.conditional and not self.conditional:
            raise ClipdiffError(f"method={method!r} needs a conditional DDPM (python -m clipdiff.train model=ddpm_cond): "
                                f"{self.keys['ddpm']} is unconditional")
        if method not in self.methods:
            raise ClipdiffError(f"method={method!r}: this pipeline has {', '.join(self.methods)}")
        if guidance is not None and guidance.kind != method:
            raise ClipdiffError(f"method={method!r} but the guidance settings are for {guidance.kind!r}")
        sampler = (Sampler.preset(sampler) if isinstance(sampler, str) else sampler).replace(steps=steps).check()
        scheduler = sampler.scheduler(self.schedule, "sampler")
        per_sample = prompt_text.per_sample(prompts, num_samples)
        n = len(per_sample) if per_sample is not None else num_samples
        if n is None or int(n) < 1 or int(batch_size) < 1:
            raise ClipdiffError(f"num_samples={n} and batch_size={batch_size} must be at least 1")
        if method == "none":
            return Prepared("none", int(n), sampler, scheduler, None, None, per_sample, [], int(seed), int(batch_size))
        settings = guidance if guidance is not None else GUIDANCE[method]()
        if scale is not None:
            settings = dataclasses.replace(settings, scale=float(scale))
        settings.check(prefix, scheduler)
        cond, matched, captions = None, per_sample, []
        if settings.guide_kind is not None:  # a gradient guide
            model = self.guides[settings.guide_kind]
            free = settings.free_text if text_encoder(model) is not None else "unsupported"
            tokenizer = getattr(model, "tokenizer", None) or getattr(getattr(model, "clip", None), "tokenizer", None)
            matched, ids, extra = prompt_text.resolve(per_sample, model.vocabulary, what=WHAT[settings.guide_kind],
                                                      free_text=free, tokenizer=tokenizer, prefix=prefix)
            cond = settings.cond_fn(model, ids, extra, scheduler, self.unet)
            captions = cond.guide.captions
        if settings.conditional:  # classifier-free: the DDPM's own caption ids (no text tower: no free text)
            in_vocab, classes, _ = prompt_text.resolve(per_sample, self.vocabulary, what="conditional DDPM",
                                                       free_text="unsupported", prefix=prefix)
            cond = settings.cfg_fn(self.unet, classes, scheduler, then=cond)
            if cond.then is None:
                matched, captions = in_vocab, list(self.vocabulary)
        return Prepared(method, int(n), sampler, scheduler, settings, cond, matched, captions, int(seed),
                        int(batch_size))

    def draw(self, job: Prepared, progress: bool = False, score: bool = True) -> GuidedOutput:
        """Sample a prepared call (all randomness from ``torch.Generator().manual_seed(seed)``); ``score``: the
        guide reads the finished samples (``guide_logits``)."""
        if job.cond is not None:
            job.cond.reset()  # a prepared call can be drawn again: the same images, fresh statistics
        start = time.perf_counter()
        recurrence = job.cond.recurrence_at if job.cond is not None and job.guidance.recurrence > 1 else 1
        images = sample(self.unet, job.scheduler, job.num_samples, generator=torch.Generator().manual_seed(job.seed),
                        steps=job.sampler.steps, batch_size=job.batch_size, cond_fn=job.cond, eta=job.sampler.eta,
                        progress=progress, recurrence=recurrence)  # a conditional DDPM: its null id unless cfg
        seconds = time.perf_counter() - start
        logits, targets = None, (job.cond.targets.cpu() if job.cond is not None else None)
        if job.cond is not None and job.cond.guide is not None and score:
            with torch.no_grad():
                logits = job.cond.guide.final_logits(images.to(self.device)).float().cpu()
        settings = {"guidance": job.guidance.as_dict() if job.guidance else None, "sampler": job.sampler.as_dict()}
        return GuidedOutput(images, job.method, job.prompts, list(job.captions), targets, logits,
                            list(job.cond.stats) if job.cond is not None else [], seconds, settings)

    def __call__(self, prompts: str | Sequence[str] | None = None, *, progress: bool = False, score: bool = True,
                 **options: Any) -> GuidedOutput:
        """``prepare(prompts, **options)`` then ``draw``: e.g. ``pipe("a red car", method="noisy_clip", scale=100,
        num_samples=4, sampler="ddim_stochastic", steps=50, seed=0)``; ``sampler`` defaults to ``ddim_stochastic``
        (DDIM, eta 1), the sampler of ``clipdiff.sample`` and ``clipdiff.evaluate``."""
        return self.draw(self.prepare(prompts, **options), progress=progress, score=score)
