"""Improved precision and recall of generated samples (Kynkäänniemi, Karras, Laine, Lehtinen & Aila, 2019,
"Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS).

Each feature set approximates its manifold by the union of balls around its points, each ball reaching to that
point's k-th nearest neighbour in its own set (k = 3 by default, as in the paper). Precision is the share of
generated (fake) features inside the real manifold — how many samples look like something real; recall is the
share of real features inside the fake manifold — how much of the real variety the samples cover.

torchmetrics (1.9) has no implementation, so this is plain torch: distances by :func:`torch.cdist` in row
chunks (float64), so a few thousand points per set fit in little memory.
"""

from __future__ import annotations

from typing import Any

import torch

from clipdiff.errors import ClipdiffError

_CHUNK = 1024


def _features(x: torch.Tensor, name: str, k: int) -> torch.Tensor:
    if k < 1:
        raise ClipdiffError(f"k must be at least 1, got {k}")
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ClipdiffError(f"{name} features must be a 2-D tensor [N, D], got {getattr(x, 'shape', type(x))}")
    if x.shape[0] < k + 1:
        raise ClipdiffError(f"precision/recall with k={k} needs at least {k + 1} {name} features, got {x.shape[0]}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ClipdiffError(f"{name} features contain NaN or inf")
    return x


def knn_radii(feats: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance of each row of ``feats`` [N, D] to its k-th nearest neighbour among the other rows: [N]."""
    x = _features(feats, "input", k)
    out = []
    for rows in x.split(_CHUNK):
        d = torch.cdist(rows, x)
        # the (k+1)-th smallest distance: the point itself (distance 0) is the first
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def inside(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Boolean [Nq]: is each query row within ``radii[j]`` of some reference row ``ref[j]`` (inside the manifold)."""
    q, r = query.to(torch.float64), ref.to(torch.float64)
    rad = radii.to(torch.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or rad.shape != (r.shape[0],):
        raise ClipdiffError(f"inside() needs query [Nq, D], ref [N, D] and radii [N], got {tuple(q.shape)}, "
                            f"{tuple(r.shape)} and {tuple(rad.shape)}")
    out = []
    for rows in q.split(_CHUNK):
        out.append((torch.cdist(rows, r) <= rad[None, :]).any(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, Any]:
    """Improved precision and recall of ``fake`` against ``real`` features (both [N, D], same D).

    Returns ``precision`` (float: share of fake inside the real manifold), ``recall`` (share of real inside the
    fake manifold), ``fake_inside_real`` (bool [N_fake]: each sample's "inside the real manifold"),
    ``real_inside_fake`` (bool [N_real]), ``k``, ``n_real`` and ``n_fake``.
    """
    r, f = _features(real, "real", k), _features(fake, "fake", k)
    if r.shape[1] != f.shape[1]:
        raise ClipdiffError(f"real and fake features differ in width ({r.shape[1]} vs {f.shape[1]})")
    fake_in = inside(f, r, knn_radii(r, k))
    real_in = inside(r, f, knn_radii(f, k))
    return {"precision": float(fake_in.double().mean()), "recall": float(real_in.double().mean()),
            "fake_inside_real": fake_in, "real_inside_fake": real_in, "k": k, "n_real": int(r.shape[0]),
            "n_fake": int(f.shape[0])}
