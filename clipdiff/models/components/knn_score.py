"""Is this a car render? The deep nearest-neighbour score of Sun et al. (2022), "Out-of-distribution detection
with deep nearest neighbors" (ICML): L2-normalise the penultimate features of a classifier, keep a bank of them for
training images, and score an input by minus its Euclidean distance to the k-th nearest bank entry. An input far
from every training image gets a low score. The refusal threshold is a low quantile of the scores of held-out real
images, so that share of real images is refused and everything scoring lower than it is too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def knn_scores(features: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """float32 [B]: −‖z − b_(k)‖ with z and the bank rows L2-normalised and b_(k) z's k-th nearest bank row (k is
    capped at the bank size). Higher means more like the bank; the range is [−2, 0]."""
    if bank.ndim != 2 or not len(bank):
        raise ValueError("knn_scores needs a non-empty [M, D] bank")
    bank = F.normalize(bank.float(), dim=1)
    k = max(1, min(int(k), len(bank)))
    out = []
    for z in F.normalize(features.float(), dim=1).split(chunk):
        kth_similarity = (z @ bank.T).topk(k, dim=1).values[:, -1]  # cosine similarity of the k-th nearest
        out.append(-(2.0 - 2.0 * kth_similarity).clamp_min(0.0).sqrt())  # ‖a − b‖² = 2 − 2 cos for unit vectors
    return torch.cat(out) if out else features.new_zeros(0)


def refusal_threshold(heldout_scores: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of held-out real images' scores, taken as the ⌊quantile·n⌋-th smallest of the n scores
    (0-based): an image scoring strictly below it is refused, which refuses at most ``quantile`` of the held-out
    images (exactly that share when quantile·n is a whole number and the scores are distinct)."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile={quantile}: must be in [0, 1)")
    if not len(heldout_scores):
        raise ValueError("refusal_threshold needs at least one held-out score")
    ordered = heldout_scores.double().flatten().sort().values
    return float(ordered[math.floor(quantile * len(ordered) + 1e-9)])
