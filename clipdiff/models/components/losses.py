"""Label-aware symmetric contrastive loss (CLIP's InfoNCE where equal captions are never negatives).

For image features ``I`` and text features ``T`` (L2-normalised, one row per item) and caption ids ``y``::

    logits = s · I Tᵀ                       targets[i, j] = [y_i == y_j] / #{k : y_k == y_i}
    loss   = ½ (CE(logits, targets) + CE(logitsᵀ, targets))     (soft-target cross-entropy, mean over rows)

With all captions distinct the targets are the identity and this is exactly ``open_clip.ClipLoss``.

Under DDP the features and caption ids of every rank are gathered; each rank scores its own rows against the
global batch (open_clip's ``local_loss=True, gather_with_grad=True``), which — with DDP's gradient averaging —
gives the gradient of the loss over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import nn


def same_caption_targets(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[len(rows), len(cols)] row-normalised mask of equal caption ids."""
    mask = (rows[:, None] == cols[None, :]).float()
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def label_aware_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                          labels: torch.Tensor | None, all_image_features: torch.Tensor | None = None,
                          all_text_features: torch.Tensor | None = None,
                          all_labels: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """The loss of the local rows against the (gathered) global batch; ``labels=None`` is plain CLIP.

    ``offset`` is where the local rows sit in the global batch (only used when ``labels`` is None).
    """
    all_image_features = image_features if all_image_features is None else all_image_features
    all_text_features = text_features if all_text_features is None else all_text_features
    logits_per_image = logit_scale * image_features @ all_text_features.T
    logits_per_text = logit_scale * text_features @ all_image_features.T
    if labels is None:
        target = torch.arange(len(image_features), device=image_features.device) + offset
    else:
        target = same_caption_targets(labels, labels if all_labels is None else all_labels)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target))


class LabelAwareClipLoss(nn.Module):
    """``loss(image_features, text_features, logit_scale, labels)``; set ``rank``/``world_size`` for DDP.

    ``label_aware=False`` gives open_clip's plain loss (use it with ``data.sampler=distinct_caption``,
    the original recipe, where a batch never holds two items of one caption).
    """

    def __init__(self, label_aware: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.label_aware = label_aware
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return label_aware_clip_loss(image_features, text_features, logit_scale,
                                         labels if self.label_aware else None)
        all_img, all_txt = gather_features(image_features, text_features, local_loss=True, gather_with_grad=True,
                                           rank=self.rank, world_size=self.world_size)
        all_labels = None
        if self.label_aware:
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            torch.distributed.all_gather(gathered, labels.contiguous())
            all_labels = torch.cat(gathered)
        return label_aware_clip_loss(image_features, text_features, logit_scale,
                                     labels if self.label_aware else None, all_img, all_txt, all_labels,
                                     offset=self.rank * len(image_features))
