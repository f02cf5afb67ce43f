"""Guided sampling: the original recipe vs clipdiff's default, and the default's guidance cost over unguided sampling.

* **Original recipe** — 1000-step ancestral DDPM (``conf/sampler/ddpm.yaml``), a clean CLIP with the ViT-B/32
  architecture (``conf/model/clip_vitb32.yaml``, open_clip, random init: only the time is measured) guiding through
  x0_hat upsampled to 224 px at every step (``conf/guidance/clip.yaml``). Too slow for this CPU: ``k`` steps are
  timed and the per-step cost is multiplied by the sampler's step count (the row says so).
* **Default** — DDIM (``conf/sampler/ddim.yaml``) with the noisy CLIP at native size and the settings of
  ``conf/guidance/noisy_clip.yaml`` (window, every-k); unguided = the same sampler without a cond_fn.

Every run is a call of one :class:`clipdiff.pipelines.guided.GuidedPipeline`, as ``python -m clipdiff.sample``
makes; the time is its sampling loop (``GuidedOutput.seconds``).

All models are the project's presets with random weights (the cost does not depend on the weights) and all runs
use the same batch size. Accuracy is not measured here: it is read from the latest ``make demo`` evaluation.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from clipdiff.bench.common import Claim, compose, interleaved, median_all, paired_ratio
from clipdiff.diffusion.guidance import Guidance
from clipdiff.diffusion.sampling import Sampler
from clipdiff.pipelines.guided import GuidedPipeline


def _container(node) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def build_parts(image_size: int = 32, model: str = "ddpm", clean: str | None = "clip_vitb32") -> dict[str, Any]:
    """UNet (conf/model/<model>.yaml), schedule, vocabulary, noisy CLIP (conf/model/noisy_clip.yaml) at the UNet's
    size, and the clean CLIP of conf/model/<clean>.yaml (the original recipe's ViT-B/32 by default; None: none)."""
    from clipdiff.data.vocab import caption_prior
    from clipdiff.models.components.noisy_clip import NoisyClipClassifier
    from clipdiff.models.components.unet import build_unet
    from clipdiff.models.noisy_clip_module import initial_clip

    vocab = sorted(caption_prior())
    ddpm = compose("train", [f"model={model}", f"data.image_size={image_size}"]).model
    schedule = _container(ddpm.diffusion)
    torch.manual_seed(0)
    unet = build_unet({**_container(ddpm.unet), "sample_size": image_size}).eval().requires_grad_(False)
    noisy_cfg = compose("train", ["model=noisy_clip", f"data.image_size={image_size}"]).model
    noisy = NoisyClipClassifier(initial_clip(vocab, None, noisy_cfg.model_name, noisy_cfg.image_size or image_size),
                                schedule, _container(noisy_cfg.embedding))
    parts = {"unet": unet, "schedule": schedule, "vocab": vocab, "noisy": noisy}
    if clean:
        clean_cfg = compose("train", [f"model={clean}"]).model
        parts["clean"] = initial_clip(vocab, None, clean_cfg.model_name, clean_cfg.image_size).eval().requires_grad_(False)
        parts["clean"].refresh_text_features()
        parts["clean_name"] = clean_cfg.model_name
    return parts


def pipeline(parts: dict[str, Any]) -> GuidedPipeline:
    """The parts as one GuidedPipeline (what ``python -m clipdiff.sample`` loads from exports)."""
    guides = {"noisy_clip": parts["noisy"], **({"clip": parts["clean"]} if "clean" in parts else {})}
    return GuidedPipeline(parts["unet"], parts["schedule"], guides)


def recipe(guidance: str, sampler: str) -> tuple[Sampler, Guidance | None]:
    """(sampler, guidance settings) of ``python -m clipdiff.sample guidance=… sampler=…`` (None for ``none``)."""
    cfg = compose("sample", [f"guidance={guidance}", f"sampler={sampler}"])
    return instantiate(cfg.sampler), (instantiate(cfg.guidance) if cfg.get("guidance") else None)


def seconds_per_image(pipe: GuidedPipeline, sampler: Sampler, guidance: Guidance | None, batch: int,
                      steps: int | None = None) -> float:
    """The sampling loop of one pipeline call on ``batch`` images (all in one batch), per image."""
    prompt = next(iter(pipe.guides.values())).vocabulary[0] if guidance is not None else None
    job = pipe.prepare(prompt, guidance=guidance, num_samples=batch, sampler=sampler, steps=steps, batch_size=batch)
    return pipe.draw(job, score=False).seconds / batch


def demo_accuracy(demo: Path, default_scale: float, clean_scale: float) -> list[Claim]:
    """Judge accuracies of the latest demo evaluation (``<demo>/evaluate/summary.csv``); 'not measured' without one."""
    summary = Path(demo) / "evaluate" / "summary.csv"
    names = ("default", "clean_clip", "unguided")
    if not summary.is_file():
        why = f"not measured: no demo evaluation at {summary} (run make demo)"
        return [Claim(f"guided/acc_caption_{n}", None, None, why) for n in names] + [
            Claim("guided/acc_default_minus_clean_clip", None, 0, why)]
    rows = list(csv.DictReader(summary.open()))

    def pick(method: str, scale: float) -> dict | None:
        return next((r for r in rows if r["method"] == method and float(r["scale"]) == float(scale)), None)

    steps = "?"
    cfg = Path(demo) / "evaluate" / ".hydra" / "config.yaml"
    if cfg.is_file():
        steps = OmegaConf.load(cfg).sampler.steps
    run = Path(demo).resolve().name
    found = {"default": (pick("noisy_clip", default_scale), f"noisy CLIP s={default_scale:g}"),
             "clean_clip": (pick("clip", clean_scale), f"demo's clean CLIP (tiny, 32 px) s={clean_scale:g}"),
             "unguided": (pick("none", 0), "no guidance")}
    claims = []
    for n, (row, what) in found.items():
        value = float(row["acc_caption"]) if row else None
        claims.append(Claim(f"guided/acc_caption_{n}", value, None,
                            f"judge top-1, {what}, demo {run}, DDIM {steps} steps" if row else
                            f"not measured: {what} not in {summary}"))
    a, b = claims[0].value, claims[1].value
    claims.append(Claim("guided/acc_default_minus_clean_clip", None if a is None or b is None else a - b, 0,
                        "judge top-1 difference (demo)"))
    for r in (found["default"][0], found["unguided"][0]):
        if r is None:
            return claims
    claims.append(Claim("guided/demo_noisy_vs_unguided_time", float(found["default"][0]["sec_per_image"]) /
                        float(found["unguided"][0]["sec_per_image"]), None, f"x (the demo's own timing, {run})"))
    return claims


def bench_sampling(batch: int = 16, reps: int = 3, recipe_steps: int = 3, image_size: int = 32,
                   steps: int | None = None, demo: Path | None = Path("outputs/latest_demo"),
                   clean: str = "clip_vitb32") -> list[Claim]:
    """``steps`` overrides the default sampler's step count and ``clean`` the original recipe's CLIP (tests only)."""
    parts = build_parts(image_size, clean=clean)
    pipe = pipeline(parts)
    ddim, noisy = recipe("noisy_clip", "ddim")
    ddpm, clean_guidance = recipe("clip", "ddpm")
    n_default, n_orig = steps or ddim.steps, ddpm.steps
    seconds_per_image(pipe, ddim, None, batch, 1)  # warm-up
    times = interleaved({
        "guided": lambda: [seconds_per_image(pipe, ddim, noisy, batch, n_default)],
        "unguided": lambda: [seconds_per_image(pipe, ddim, None, batch, n_default)],
        "original": lambda: [seconds_per_image(pipe, ddpm, clean_guidance, batch, recipe_steps) * n_orig / recipe_steps],
    }, reps)
    default, original = median_all(times["guided"]), median_all(times["original"])
    window, every = list(noisy.window), noisy.every
    return [
        Claim(f"guided/original_s_per_image@b{batch}", original, None,
              f"s, EXTRAPOLATED: {recipe_steps} of {n_orig} DDPM steps timed x {n_orig / recipe_steps:g}, "
              f"{parts['clean_name']} at {parts['clean'].image_size} px"),
        Claim(f"guided/default_s_per_image@b{batch}", default, None,
              f"s, measured: DDIM {n_default} steps, noisy CLIP window {window} every {every}"),
        Claim(f"guided/unguided_s_per_image@b{batch}", median_all(times["unguided"]), None,
              f"s, measured: DDIM {n_default} steps"),
        Claim("guided/original_vs_default_time", original / default, 200,
              "x less time (original extrapolated)"),
        Claim("guided/noisy_vs_unguided_time", paired_ratio(times, "guided", "unguided"), 1.3,
              f"x (median of {reps} paired reps)", higher_is_better=False),
        *([] if demo is None else demo_accuracy(demo, float(noisy.scale), float(clean_guidance.scale))),
    ]
