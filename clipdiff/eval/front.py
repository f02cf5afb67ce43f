"""The accuracy–realism front: which guidance setting is each method's default, and the plots that show why.

A guided setting buys judged accuracy with realism: the stronger the push, the further the samples move from real
renders. Each method's **default** is its most accurate setting whose realism stays within ``tolerance`` of the
unguided samples' on ``measure`` (the grey two-sample test by default: shape only, so a colour change is free):

    default(method) = argmax_{scale : measure(method, scale) <= measure(none) + tolerance} acc_caption

(ties go to the smaller scale; no default when no scale stays within the tolerance). The front itself is the set
of settings that no other setting beats on both accuracy and realism.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("clipdiff.evaluate")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def mark_defaults(summary: Sequence[MutableMapping[str, Any]], measure: str = "c2st_grey",
                  tolerance: float = 0.05) -> dict[str, float | None]:
    """Set ``is_default`` on every summary row (True on each guided method's default row) and return
    ``{method: default scale or None}``. Without an unguided row or a finite ``measure`` there, no default."""
    base = next((r for r in summary if r["method"] == "none"), None)
    limit = base[measure] + tolerance if base is not None and _finite(base.get(measure)) else math.nan
    chosen: dict[str, float | None] = {}
    for r in summary:
        r["is_default"] = False
    for method in dict.fromkeys(r["method"] for r in summary if r["method"] != "none"):
        rows = [r for r in summary if r["method"] == method]
        ok = [r for r in rows if _finite(r.get(measure)) and _finite(r.get("acc_caption")) and r[measure] <= limit]
        if not ok:
            chosen[method] = None
            log.warning("%s: no scale keeps %s within %.2f of unguided (%s): no default", method, measure, tolerance,
                        "n/a" if base is None else f"{base.get(measure, math.nan):.3f}")
            continue
        best = max(ok, key=lambda r: (r["acc_caption"], -r["scale"]))
        best["is_default"] = True
        chosen[method] = best["scale"]
    return chosen


def on_front(rows: Sequence[Mapping[str, Any]], realism: str, accuracy: str = "acc_caption") -> list[bool]:
    """For each row: is it on the Pareto front (no other row at least as accurate and at least as realistic, and
    better on one)? Lower ``realism`` is better. Rows without both numbers are not on it."""
    pts = [(r.get(realism), r.get(accuracy)) for r in rows]
    out = []
    for x, y in pts:
        if not (_finite(x) and _finite(y)):
            out.append(False)
            continue
        out.append(not any(_finite(x2) and _finite(y2) and x2 <= x and y2 >= y and (x2 < x or y2 > y)
                           for x2, y2 in pts))
    return out


def plot_front(summary: Sequence[Mapping[str, Any]], path: Path, measures: Sequence[str] = ("c2st_grey", "fd_indep"),
               tolerance: float = 0.05, tolerance_measure: str = "c2st_grey") -> Path | None:
    """Judged caption accuracy against each realism measure: a line per guided method through its scales (each
    point labelled with its scale), the unguided row as a star, the front as a grey step line, the defaults ringed
    and the tolerance as a dotted line. None when no row has the numbers."""
    measures = [m for m in measures if any(_finite(r.get(m)) for r in summary)]
    if not measures:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from clipdiff.utils.images import save_figure

    fig, axes = plt.subplots(1, len(measures), figsize=(5.2 * len(measures), 4.2), dpi=100, squeeze=False)
    base = next((r for r in summary if r["method"] == "none"), None)
    for ax, m in zip(axes[0], measures):
        for method in dict.fromkeys(r["method"] for r in summary):
            rs = sorted((r for r in summary if r["method"] == method and _finite(r.get(m))), key=lambda r: r["scale"])
            if not rs:
                continue
            if method == "none":
                ax.plot([rs[0][m]], [rs[0]["acc_caption"]], marker="*", ms=14, color="black", ls="",
                        label="none (unguided)")
                continue
            line = ax.plot([r[m] for r in rs], [r["acc_caption"] for r in rs], marker="o", label=method)[0]
            for r in rs:
                ax.annotate(f"{r['scale']:g}", (r[m], r["acc_caption"]), fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
                if r.get("is_default"):
                    ax.plot([r[m]], [r["acc_caption"]], marker="o", ms=14, mfc="none", mec=line.get_color(), mew=2)
        front = sorted((r for r, f in zip(summary, on_front(summary, m)) if f), key=lambda r: r[m])
        if len(front) > 1:
            ax.step([r[m] for r in front], [r["acc_caption"] for r in front], where="post", color="gray", alpha=0.5,
                    lw=3, zorder=0, label="front")
        if m == tolerance_measure and base is not None and _finite(base.get(m)):
            ax.axvline(base[m] + tolerance, color="gray", ls=":", label=f"unguided + {tolerance:g}")
        ax.set_xlabel(f"{m} (lower: closer to held-out real renders)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("judged caption accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("accuracy against realism; ringed: each method's default")
    return save_figure(fig, path)


def plot_eps_change(steps: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """The realised RMS change of eps per sampling step (0 = noisiest), a line per method × scale: how hard each
    setting actually pushed, comparable across methods whose scales mean different things."""
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from clipdiff.utils.images import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    runs: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for s in steps:
        runs.setdefault((s["method"], s["scale"]), []).append(s)
    for (method, scale), rs in runs.items():
        rs = sorted(rs, key=lambda s: s["step"])
        ax.plot([s["step"] for s in rs], [s["eps_shift_rms"] for s in rs], marker=".", label=f"{method} s={scale:g}")
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("RMS change of eps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
