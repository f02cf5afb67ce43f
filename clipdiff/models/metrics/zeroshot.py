"""Zero-shot evaluation of a CLIP over the caption vocabulary (torchmetrics).

:class:`ZeroShotMetrics` is updated with ``[B, V]`` caption logits (or any scores) and the true caption ids::

    acc_caption        top-1 over the vocabulary, micro (= image→text R@1, also logged as ``r1``)
    acc_caption_macro  top-1 per caption, averaged over the captions that have images (balanced accuracy)
    acc_colour         the predicted caption names the right colour part ("white and red" as a whole)
    acc_type           the predicted caption names the right body type
    r5                 image→text R@5: the true caption among the 5 best
    t2i_r1, t2i_r5     text→image hit rate: some image of the caption among its 1 / 5 best-scored images
    t2i_map            text→image mean average precision

plus per-caption accuracy and the confusion matrix (:meth:`per_class`, :meth:`confusion`,
:func:`plot_confusion`). :func:`evaluate` runs a ClipClassifier over a dataloader.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from clipdiff.data.vocab import parse_caption
from clipdiff.utils.images import float_images, save_figure

log = logging.getLogger(__name__)


class ZeroShotMetrics(nn.Module):
    def __init__(self, vocabulary: Sequence[str], prefix: str = "val/", retrieval: bool = True):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.prefix = prefix
        parsed = [parse_caption(c) for c in self.vocabulary]
        self.colour_names = sorted({p.colour for p in parsed})
        self.type_names = sorted({p.body_type for p in parsed})
        self.register_buffer("colour_of", torch.tensor([self.colour_names.index(p.colour) for p in parsed]))
        self.register_buffer("type_of", torch.tensor([self.type_names.index(p.body_type) for p in parsed]))
        v = len(self.vocabulary)
        self.caption = MulticlassAccuracy(v, average="micro")
        self.caption_top5 = MulticlassAccuracy(v, top_k=min(5, v), average="micro")
        self.colour = MulticlassAccuracy(len(self.colour_names), average="micro")
        self.body_type = MulticlassAccuracy(len(self.type_names), average="micro")
        self.confusion_matrix = MulticlassConfusionMatrix(v)
        self.retrieval = retrieval
        if retrieval:
            self.t2i_r1 = RetrievalHitRate(top_k=1, empty_target_action="skip")
            self.t2i_r5 = RetrievalHitRate(top_k=5, empty_target_action="skip")
            self.t2i_map = RetrievalMAP(empty_target_action="skip")

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = logits.detach().float(), target.long()
        pred = logits.argmax(dim=1)
        self.caption.update(pred, target)
        self.caption_top5.update(logits, target)
        self.colour.update(self.colour_of[pred], self.colour_of[target])
        self.body_type.update(self.type_of[pred], self.type_of[target])
        self.confusion_matrix.update(pred, target)
        if self.retrieval:
            v, b = logits.shape[1], logits.shape[0]
            queries = torch.arange(v, device=logits.device)
            relevant = (queries[:, None] == target[None, :]).flatten()
            indexes = queries.repeat_interleave(b)
            scores = logits.T.flatten()
            for m in (self.t2i_r1, self.t2i_r5, self.t2i_map):
                m.update(scores, relevant, indexes=indexes)

    def compute(self) -> dict[str, float]:
        acc = float(self.caption.compute())
        out = {
            "acc_caption": acc,
            "acc_caption_macro": self.macro(),
            "acc_colour": float(self.colour.compute()),
            "acc_type": float(self.body_type.compute()),
            "r1": acc,
            "r5": float(self.caption_top5.compute()),
        }
        if self.retrieval:
            out |= {"t2i_r1": float(self.t2i_r1.compute()), "t2i_r5": float(self.t2i_r5.compute()),
                    "t2i_map": float(self.t2i_map.compute())}
        return {self.prefix + k: v for k, v in out.items()}

    def macro(self) -> float:
        """Mean per-caption accuracy over the captions that have images (balanced accuracy)."""
        acc = torch.tensor([a for n, a in self.per_class().values() if n > 0])
        return float(acc.mean()) if len(acc) else math.nan

    def confusion(self) -> torch.Tensor:
        """[V, V] counts: row = true caption, column = predicted caption."""
        return self.confusion_matrix.compute()

    def per_class(self) -> dict[str, tuple[int, float]]:
        """caption → (number of images, top-1 accuracy); NaN accuracy for captions without images."""
        cm = self.confusion().double()
        support = cm.sum(dim=1)
        acc = torch.where(support > 0, cm.diagonal() / support.clamp_min(1), torch.full_like(support, math.nan))
        return {c: (int(n), float(a)) for c, n, a in zip(self.vocabulary, support.tolist(), acc.tolist())}

    def reset(self) -> None:
        for m in self.children():
            m.reset()

    def save(self, directory: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>_per_class.tsv`` and ``<stem>_confusion.png`` under ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tsv = directory / f"{stem}_per_class.tsv"
        with tsv.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["caption", "images", "accuracy"])
            for caption, (n, a) in sorted(self.per_class().items(), key=lambda kv: -kv[1][0]):
                w.writerow([caption, n, "" if math.isnan(a) else f"{a:.4f}"])
        png = plot_confusion(self.confusion(), self.vocabulary, directory / f"{stem}_confusion.png", title=stem)
        return tsv, png


def plot_confusion(matrix: torch.Tensor, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true caption, columns: predicted caption)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = matrix.double().cpu()
    rows = cm / cm.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(labels)
    size = max(4.0, 0.22 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(rows.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xlabel("predicted caption")
    ax.set_ylabel("true caption")
    correct = int(cm.diagonal().sum())
    ax.set_title(f"{title}  top-1 {correct}/{int(cm.sum())}".strip(), fontsize=9)
    return save_figure(fig, path)


@torch.no_grad()
def evaluate(classifier, batches: Iterable[dict[str, Any]], data_vocabulary: Sequence[str] | None = None,
             prefix: str = "val/", device: str | torch.device = "cpu") -> tuple[dict[str, float], ZeroShotMetrics]:
    """Zero-shot metrics of a :class:`~clipdiff.models.components.clip.ClipClassifier` over ``batches``.

    ``data_vocabulary`` is the list the batches' caption ids index (e.g. ``datamodule.vocab.to_list()``);
    when given, ids are mapped onto the classifier's vocabulary (a caption it does not know is an error).
    """
    remap = None
    if data_vocabulary is not None and list(data_vocabulary) != list(classifier.vocabulary):
        remap = torch.tensor([classifier.caption_id(c) for c in data_vocabulary], device=device)
    metrics = ZeroShotMetrics(classifier.vocabulary, prefix=prefix).to(device)
    classifier = classifier.to(device).eval()
    classifier.refresh_text_features()
    for batch in batches:
        target = batch["caption"].to(device)
        metrics.update(classifier.logits(float_images(batch["image"].to(device))), remap[target] if remap is not None else target)
    return metrics.compute(), metrics
