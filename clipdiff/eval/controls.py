"""Control images for the judge: things that keep some of a real render's statistics but are not car renders.

All take real renders ``x01`` [B, 3, H, W] in [0, 1] (white background, as the renderer draws them) and return
images of the same shape; the noise makers take a ``torch.Generator`` so a control set is reproducible.

- :func:`flat_silhouette` — the car's pixels (the non-white ones, :func:`car_mask`) filled with one colour, the
  mean colour of those pixels: outline and paint colour kept, shading, windows and wheels gone.
- :func:`noise_inside` — colour-matched noise inside the car: each car pixel and channel drawn independently from
  the beta distribution with that image's car pixels' per-channel mean and std (a beta, not a clipped normal,
  so the values stay in [0, 1] and the two moments match exactly); the background stays as rendered (white).
- :func:`noise_image` — colour-matched noise over the whole image: the same with the per-channel mean and std of
  all the image's pixels (car and background): no outline at all.
- :func:`load_sample_folder` — the PNGs of ``samples/<method>/<scale>/<caption slug>/`` with their captions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipdiff.errors import ClipdiffError
from clipdiff.eval.report import slug

WHITE = 0.96  # a pixel is background when every channel is at least this (the renders' white is 250..255 / 255)


def car_mask(x01: torch.Tensor, white: float = WHITE) -> torch.Tensor:
    """bool [B, 1, H, W]: the pixels with some channel below ``white``."""
    return (x01 < white).any(dim=1, keepdim=True)


def _masked_stats(x01: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and std [B, 3, 1, 1] of the pixels under ``mask`` (whole image where empty)."""
    m = mask.expand_as(x01).float()
    empty = m.sum(dim=(2, 3), keepdim=True) == 0
    m = torch.where(empty, torch.ones_like(m), m)
    n = m.sum(dim=(2, 3), keepdim=True)
    mean = (x01 * m).sum(dim=(2, 3), keepdim=True) / n
    std = (((x01 - mean) ** 2 * m).sum(dim=(2, 3), keepdim=True) / n).sqrt()
    return mean, std


def flat_silhouette(x01: torch.Tensor) -> torch.Tensor:
    mask = car_mask(x01)
    mean, _ = _masked_stats(x01, mask)
    return torch.where(mask, mean.expand_as(x01), x01)


def matched_noise(mean: torch.Tensor, std: torch.Tensor, shape: torch.Size,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent draws in [0, 1] from Beta(a, b) with mean ``mean`` and std ``std`` (broadcast to ``shape``):
    a = m·c, b = (1 − m)·c with c = m(1 − m)/v − 1. Data in [0, 1] always has v ≤ m(1 − m); v is kept just
    below that bound and above 1e-6, m inside (0.001, 0.999)."""
    m = mean.double().clamp(1e-3, 1 - 1e-3)
    v = torch.minimum((std.double() ** 2).clamp_min(1e-6), 0.999 * m * (1 - m))
    c = m * (1 - m) / v - 1
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # torch.distributions draws from the global generator
        torch.manual_seed(seed)
        return torch.distributions.Beta((m * c).expand(shape), ((1 - m) * c).expand(shape)).sample().float()


def noise_inside(x01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    mask = car_mask(x01)
    mean, std = _masked_stats(x01, mask)
    return torch.where(mask, matched_noise(mean, std, x01.shape, generator), x01)


def noise_image(x01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    mean, std = _masked_stats(x01, torch.ones_like(x01[:, :1], dtype=torch.bool))
    return matched_noise(mean, std, x01.shape, generator)


def load_sample_folder(folder: str | Path, vocabulary: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The images [N, 3, H, W] in [0, 1] under ``folder/<caption slug>/*.png`` (what ``clipdiff.evaluate`` saves
    per method and scale) and the caption of each, read back through the slugs of ``vocabulary``."""
    folder = Path(folder)
    by_slug = {slug(c): c for c in vocabulary}
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    unknown = [p.name for p in subdirs if p.name not in by_slug]
    if not subdirs or unknown:
        raise ClipdiffError(f"{folder}: expected <caption>/NNNN.png folders of captions in the judge's vocabulary"
                            f"{f' (unknown: {unknown[:3]})' if unknown else ' (none found)'}")
    images, captions = [], []
    for sub in subdirs:
        for png in sorted(sub.glob("*.png")):
            images.append(np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8))
            captions.append(by_slug[sub.name])
    if not images:
        raise ClipdiffError(f"{folder}: no PNG samples under its caption folders")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255), captions
