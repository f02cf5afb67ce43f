"""Outlier exposure for the judge's type net (Hendrycks et al., 2019, "Deep anomaly detection with outlier
exposure", ICLR): during training part of each batch is replaced by synthetic non-renders and the type net is
taught to be unsure on them (cross-entropy to the uniform distribution over body types). Its features for such
inputs then move away from those of real renders, which the k-NN car-render score reads.

The synthetic negatives are made from the training renders themselves and are deliberately of other kinds than
the controls the judge is checked on (:mod:`clipdiff.eval.controls`: flat silhouettes, colour-matched noise,
over-guided diffusion blobs), so refusing those controls is not learnt from them:

- ``shuffle`` — a render cut into ``tiles`` × ``tiles`` tiles put back in a random order: real local texture and
  edges, no car-shaped whole;
- ``mix`` — two different renders joined along a random vertical or horizontal cut: real halves of two cars (other
  poses, sizes, colours) that do not make one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KINDS = ("shuffle", "mix")


def tile_shuffle(x: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Each image's ``tiles``² tiles in a random order (H and W must divide by ``tiles``)."""
    b, c, h, w = x.shape
    if h % tiles or w % tiles:
        raise ValueError(f"tile_shuffle: {h}x{w} images do not divide into {tiles}x{tiles} tiles")
    th, tw = h // tiles, w // tiles
    t = x.reshape(b, c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, tiles * tiles, c, th, tw)
    order = torch.rand(b, tiles * tiles, device=x.device).argsort(dim=1)
    t = t[torch.arange(b, device=x.device)[:, None], order]
    return t.reshape(b, tiles, tiles, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def half_mix(x: torch.Tensor) -> torch.Tensor:
    """Image i joined with image i+1 (cyclically) along a random vertical or horizontal cut in the middle half."""
    b, _, h, w = x.shape
    other = x.roll(1, dims=0)
    frac = torch.rand(b, 1, 1, 1, device=x.device) * 0.5 + 0.25
    vertical = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w) < frac * w
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1) < frac * h
    keep = torch.where(vertical, cols.expand(b, 1, h, w), rows.expand(b, 1, h, w))
    return torch.where(keep, x, other)


def make_outliers(x: torch.Tensor, kinds: Sequence[str] = KINDS, tiles: int = 4) -> torch.Tensor:
    """Synthetic negatives, one per image of ``x``, the kinds taking turns over the batch."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"outlier kinds {list(kinds)}: choose from {', '.join(KINDS)}")
    out = torch.empty_like(x)
    for i, kind in enumerate(kinds):
        part = x[i::len(kinds)]
        out[i::len(kinds)] = tile_shuffle(part, tiles) if kind == "shuffle" else half_mix(part)
    return out


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the uniform distribution to softmax(logits): Hendrycks et al.'s OE term."""
    return -torch.log_softmax(logits, dim=1).mean()
