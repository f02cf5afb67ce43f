"""Agreement of automatic labels with ground truth: accuracies, per-class tables, confusion matrices.

:func:`agreement` computes everything from (predicted, true) caption pairs; :func:`write_report` writes it as
``agreement.txt``, ``agreement.md``, ``agreement.json`` and heat maps ``confusion_{type,colour,caption}.png``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipdiff.data.vocab import BODY_TYPES, parse_caption
from clipdiff.utils.images import save_figure
from clipdiff.utils.io import atomic_open


@dataclass
class Confusion:
    labels: list[str]  # row (truth) and column (prediction) order
    counts: np.ndarray  # (n, n) int: counts[i, j] = objects of true labels[i] predicted as labels[j]

    @classmethod
    def build(cls, truth: Sequence[str], pred: Sequence[str], order: Sequence[str] | None = None) -> Confusion:
        freq = Counter(truth)
        labels = list(order or [])
        extra = sorted(set(truth) | set(pred), key=lambda s: (-freq[s], s))
        labels += [s for s in extra if s not in labels]
        index = {s: i for i, s in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
        np.add.at(counts, ([index[t] for t in truth], [index[p] for p in pred]), 1)
        return cls(labels, counts)


@dataclass
class Agreement:
    n: int
    accuracy: dict[str, float]  # colour, type, caption
    per_class: dict[str, list[dict]]  # level → rows (label, support, accuracy, …)
    confusion: dict[str, Confusion] = field(default_factory=dict)
    note: str = ""

    def summary(self) -> str:
        a = self.accuracy
        return (f"agreement with ground truth on {self.n} objects: colour {a['colour']:.1%}, "
                f"type {a['type']:.1%}, caption {a['caption']:.1%}")

    def to_json(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "per_class": self.per_class, "note": self.note,
                "confusion": {k: {"labels": c.labels, "counts": c.counts.tolist()} for k, c in self.confusion.items()}}


def agreement(pred: Sequence[str], truth: Sequence[str], note: str = "") -> Agreement:
    """Colour / type / caption agreement of predicted captions with true ones (same order)."""
    if len(pred) != len(truth):
        raise ValueError("pred and truth differ in length")
    p = [parse_caption(c) for c in pred]
    t = [parse_caption(c) for c in truth]
    levels = {
        "caption": ([c.text for c in t], [c.text for c in p]),
        "colour": ([c.colour for c in t], [c.colour for c in p]),
        "type": ([c.body_type for c in t], [c.body_type for c in p]),
    }
    n = len(pred)
    acc = {k: (float(np.mean([a == b for a, b in zip(*v)])) if n else 0.0) for k, v in levels.items()}
    per_class: dict[str, list[dict]] = {}
    for level, (tl, pl) in levels.items():
        rows = []
        for label, support in sorted(Counter(tl).items(), key=lambda kv: (-kv[1], kv[0])):
            idx = [i for i, x in enumerate(tl) if x == label]
            row = {"label": label, "support": support, "accuracy": float(np.mean([pl[i] == label for i in idx]))}
            if level == "caption":
                row["colour"] = float(np.mean([p[i].colour == t[i].colour for i in idx]))
                row["type"] = float(np.mean([p[i].body_type == t[i].body_type for i in idx]))
            predicted = sum(1 for x in pl if x == label)
            row["precision"] = float(sum(1 for i in idx if pl[i] == label) / predicted) if predicted else float("nan")
            rows.append(row)
        per_class[level] = rows
    confusion = {
        "type": Confusion.build(levels["type"][0], levels["type"][1], order=BODY_TYPES),
        "colour": Confusion.build(*levels["colour"]),
        "caption": Confusion.build(*levels["caption"]),
    }
    return Agreement(n, acc, per_class, confusion, note)


def _table(rows: list[dict], level: str, markdown: bool) -> list[str]:
    cols = ["label", "support", "accuracy", "precision"] + (["colour", "type"] if level == "caption" else [])

    def fmt(v):
        if isinstance(v, float):
            return "—" if np.isnan(v) else f"{v:.1%}"
        return str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join([" --- "] * len(cols)) + "|"]
        return out + ["| " + " | ".join(c) + " |" for c in cells]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return [line(cols)] + [line(r) for r in cells]


def _matrix_text(c: Confusion, markdown: bool) -> list[str]:
    labels = c.labels
    if markdown:
        out = ["| true \\ predicted | " + " | ".join(labels) + " |", "|" + "|".join([" --- "] * (len(labels) + 1)) + "|"]
        return out + [f"| {lab} | " + " | ".join(str(v) if v else "·" for v in row) + " |"
                      for lab, row in zip(labels, c.counts)]
    w = max(len(s) for s in labels)
    cw = max(3, max(len(str(int(c.counts.max()))), 1))
    head = " " * (w + 2) + " ".join(f"{j:>{cw}}" for j in range(len(labels)))
    out = [head]
    for i, (lab, row) in enumerate(zip(labels, c.counts)):
        out.append(f"{lab:>{w}}  " + " ".join(f"{(str(v) if v else '.'):>{cw}}" for v in row) + f"   [{i}]")
    return out


def render_text(a: Agreement, markdown: bool = False, matrices: Sequence[str] = ("type", "colour")) -> str:
    h = (lambda s: f"## {s}") if markdown else (lambda s: f"{s}\n" + "-" * len(s))
    lines = [("# " if markdown else "") + "Label agreement with ground truth", "", a.summary(), ""]
    if a.note:
        lines += [a.note, ""]
    for level in ("type", "colour", "caption"):
        lines += [h(f"Per {level}"), ""] + _table(a.per_class[level], level, markdown) + [""]
    for level in matrices:
        c = a.confusion[level]
        lines += [h(f"Confusion ({level}; rows: truth, columns: prediction"
                    + ("" if markdown else ", numbered as the rows") + ")"), ""]
        lines += _matrix_text(c, markdown) + [""]
    return "\n".join(lines)


def plot_confusion(c: Confusion, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(c.labels)
    rows = c.counts.sum(1, keepdims=True)
    frac = np.where(rows > 0, c.counts / np.maximum(rows, 1), 0.0)
    size = max(4.0, 0.32 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), c.labels, rotation=90, fontsize=7 if n > 15 else 9)
    ax.set_yticks(range(n), c.labels, fontsize=7 if n > 15 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if c.counts[i, j]:
                    ax.text(j, i, str(c.counts[i, j]), ha="center", va="center", fontsize=6 if n > 15 else 8,
                            color="white" if frac[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return save_figure(fig, path, dpi=110)


def write_report(a: Agreement, out_dir: str | Path, prefix: str = "agreement") -> list[Path]:
    """Write the report files into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".txt", render_text(a)), (".md", render_text(a, markdown=True))):
        p = out_dir / f"{prefix}{suffix}"
        with atomic_open(p, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        paths.append(p)
    p = out_dir / f"{prefix}.json"
    with atomic_open(p, "w", encoding="utf-8") as f:
        json.dump(a.to_json(), f, indent=1)
    paths.append(p)
    for level in ("type", "colour", "caption"):
        paths.append(plot_confusion(a.confusion[level], out_dir / f"confusion_{level}.png",
                                    f"{level}: {a.accuracy[level]:.1%} of {a.n}"))
    return paths
