"""Accuracy and calibration of caption classifiers on noisy images, per timestep bucket, and the accuracy-vs-t plot.

:class:`TimestepBucketMetrics` is updated with ``[N, K]`` caption logits, the true caption ids and the timestep of
each row; it splits ``0..T-1`` into ``num_buckets`` equal buckets and computes, with torchmetrics::

    <prefix><name>acc_caption     top-1 over all rows (all t)        <prefix><name>ece   calibration error, all t
    <prefix><name>acc_t<lo>       top-1 in the bucket starting at lo <prefix><name>ece_t<lo>
    <prefix><name>acc_macro_t<lo> top-1 averaged over the captions (balanced), per bucket
    <prefix><name>acc_upper       top-1 for t >= T/2 (the buckets in the noisy half of the schedule)
    <prefix><name>acc_majority    always answering the most frequent caption: what pure noise allows
    (and acc_caption_macro, acc_upper_macro)

(ECE: ``MulticlassCalibrationError``, 15 bins, L1, on the softmax of the logits). :func:`fixed_noisy_batch` makes
the validation x_t reproducible; :func:`plot_accuracy_vs_t` draws several models' curves side by side.
"""

from __future__ import annotations

import contextlib
import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError, MulticlassConfusionMatrix

from clipdiff.utils.images import save_figure


def bucket_edges(num_timesteps: int, num_buckets: int = 10) -> torch.Tensor:
    """[num_buckets + 1] integer edges; bucket i holds ``edges[i] <= t < edges[i+1]``."""
    if not 1 <= num_buckets <= num_timesteps:
        raise ValueError(f"num_buckets={num_buckets} must be in 1..{num_timesteps}")
    return torch.linspace(0, num_timesteps, num_buckets + 1).round().long()


def bucket_of(t: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(t.long(), edges[1:-1].to(t.device), right=True)


@contextlib.contextmanager
def _quiet_empty():
    """Silence torchmetrics' 'compute before update' warning for buckets this rank saw no rows of."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        yield


class TimestepBucketMetrics(nn.Module):
    """Per-bucket confusion matrices (→ top-1, balanced top-1, counts) and calibration errors (torchmetrics)."""

    def __init__(self, num_classes: int, num_timesteps: int, num_buckets: int = 10, prefix: str = "val/",
                 name: str = "", n_bins: int = 15):
        super().__init__()
        self.prefix, self.name = prefix, name
        self.num_timesteps = num_timesteps
        self.register_buffer("edges", bucket_edges(num_timesteps, num_buckets), persistent=False)
        digits = len(str(num_timesteps - 1))
        self.labels = [f"t{int(lo):0{digits}d}" for lo in self.edges[:-1]]
        self.confusion = nn.ModuleList(MulticlassConfusionMatrix(num_classes) for _ in range(num_buckets))
        self.bucket_ece = nn.ModuleList(MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1")
                                        for _ in range(num_buckets))
        self.ece = MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1")

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> None:
        logits, target, t = logits.detach().float(), target.long(), torch.as_tensor(t, device=logits.device)
        if t.ndim == 0:
            t = t.expand(len(target))
        probs, pred = logits.softmax(dim=1), logits.argmax(dim=1)
        self.ece.update(probs, target)
        bucket = bucket_of(t, self.edges)
        for b in bucket.unique().tolist():
            rows = bucket == b
            self.confusion[b].update(pred[rows], target[rows])
            self.bucket_ece[b].update(probs[rows], target[rows])

    def matrices(self) -> torch.Tensor:
        """[buckets, K, K] counts (row: true caption, column: predicted), summed over DDP ranks."""
        with _quiet_empty():  # every rank computes every bucket (a collective under DDP), empty ones too
            return torch.stack([cm.compute() for cm in self.confusion]).double()

    @staticmethod
    def _scores(cm: torch.Tensor) -> tuple[int, float, float]:
        """(rows, top-1, top-1 averaged over the captions that have rows) of one confusion matrix."""
        support = cm.sum(dim=1)
        n = int(support.sum())
        if n == 0:
            return 0, math.nan, math.nan
        present = support > 0
        return n, float(cm.diagonal().sum() / n), float((cm.diagonal()[present] / support[present]).mean())

    def per_bucket(self) -> list[dict[str, float]]:
        """One row per bucket: ``t_lo``, ``t_hi`` (inclusive), ``n``, ``acc``, ``acc_macro``, ``ece`` (NaN: empty)."""
        rows = []
        for i, cm in enumerate(self.matrices()):
            n, acc, macro = self._scores(cm)
            with _quiet_empty():
                ece = float(self.bucket_ece[i].compute()) if n else math.nan
            rows.append({"t_lo": int(self.edges[i]), "t_hi": int(self.edges[i + 1]) - 1, "n": n, "acc": acc,
                         "acc_macro": macro, "ece": ece})
        return rows

    def compute(self) -> dict[str, float]:
        p = self.prefix + self.name
        cms = self.matrices()
        total = cms.sum(dim=0)
        n, acc, macro = self._scores(total)
        _, upper, upper_macro = self._scores(cms[self.edges[:-1] >= self.num_timesteps / 2].sum(dim=0))
        support = total.sum(dim=1)
        out = {f"{p}acc_caption": acc, f"{p}acc_caption_macro": macro, f"{p}ece": float(self.ece.compute()) if n else math.nan,
               f"{p}acc_upper": upper, f"{p}acc_upper_macro": upper_macro,
               f"{p}acc_majority": float(support.max() / n) if n else math.nan}
        for label, row in zip(self.labels, self.per_bucket()):
            out[f"{p}acc_{label}"] = row["acc"]
            out[f"{p}acc_macro_{label}"] = row["acc_macro"]
            out[f"{p}ece_{label}"] = row["ece"]
        return out

    def reset(self) -> None:
        for m in (self.ece, *self.confusion, *self.bucket_ece):
            m.reset()


def fixed_noisy_batch(x0: torch.Tensor, scheduler, edges: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image of ``x0`` ([-1, 1]) noised once per bucket at a timestep drawn inside that bucket.

    Returns ``(x_t, t, index)`` with ``len(edges) - 1`` rows per image (``index`` maps rows back to ``x0``); the
    draw depends on ``seed`` only (a CPU generator), so validation compares like with like across epochs.
    """
    gen = torch.Generator().manual_seed(int(seed))
    b, n = x0.shape[0], len(edges) - 1
    lo, width = edges[:-1].repeat_interleave(b), (edges[1:] - edges[:-1]).repeat_interleave(b)
    t = lo + (torch.rand(n * b, generator=gen) * width).long().clamp_max(width - 1)
    noise = torch.randn((n * b, *x0.shape[1:]), generator=gen).to(x0)
    index = torch.arange(b).repeat(n)
    x_t = scheduler.add_noise(x0[index.to(x0.device)], noise, t.to(x0.device))
    return x_t, t.to(x0.device), index.to(x0.device)


def write_bucket_table(path: str | Path, rows: Mapping[str, Sequence[Mapping[str, float]]]) -> Path:
    """TSV: t_lo, t_hi, n, then ``acc_<model>``, ``acc_macro_<model>``, ``ece_<model>`` for each model of ``rows``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(rows)
    first = rows[names[0]]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        keys = ("acc", "acc_macro", "ece")
        w.writerow(["t_lo", "t_hi", "n", *(f"{k}_{m}" for k in keys for m in names)])
        for i, r in enumerate(first):
            w.writerow([r["t_lo"], r["t_hi"], r["n"], *(f"{rows[m][i][k]:.4f}" for k in keys for m in names)])
    return path


def plot_accuracy_vs_t(rows: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = "",
                       chance: float | None = None) -> Path:
    """Accuracy (top: top-1 solid, balanced dashed) and calibration error (bottom) against t, per model.

    ``rows`` is ``{model name: TimestepBucketMetrics.per_bucket()}``; ``chance`` draws the majority-caption line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_ece) = plt.subplots(2, 1, figsize=(6.4, 6.0), dpi=100, sharex=True)
    for name, table in rows.items():
        centres = [(r["t_lo"] + r["t_hi"]) / 2 for r in table]
        (line,) = ax_acc.plot(centres, [r["acc"] for r in table], marker="o", label=f"{name} top-1")
        if "acc_macro" in table[0]:
            ax_acc.plot(centres, [r["acc_macro"] for r in table], marker=".", linestyle="--", color=line.get_color(),
                        label=f"{name} balanced (mean over captions)")
        ax_ece.plot(centres, [r["ece"] for r in table], marker="o", color=line.get_color(), label=name)
    if chance is not None and not math.isnan(chance):
        ax_acc.axhline(chance, color="grey", linestyle=":", linewidth=1, label="majority caption")
    ax_acc.set_ylabel("caption accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_acc.set_title(title, fontsize=9)
    ax_ece.set_ylabel("calibration error (ECE)")
    ax_ece.set_xlabel("timestep t (bucket centre)")
    ax_ece.set_ylim(0, 1)
    ax_ece.grid(alpha=0.3)
    return save_figure(fig, path)
