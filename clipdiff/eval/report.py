"""The evaluation report: bootstrap CIs, ``results.csv``, ``summary.csv``, grids, the accuracy-vs-scale plot,
``report.md`` and the wandb run.

A *row* is one method × caption × scale (``RESULT_COLUMNS``); a *summary* pools the captions of one
method × scale. Accuracies are judge hits (per sample, bool); their 95% CIs are percentile bootstraps
(stratified by caption for the pooled rows).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipdiff.utils.images import labelled_rows, save_figure, save_png, to_uint8
from clipdiff.utils.io import atomic_open

ACC = ("caption", "colour", "type")
RESULT_COLUMNS = ["method", "caption", "scale", "n", "acc_caption", "acc_caption_lo", "acc_caption_hi",
                  "acc_colour", "acc_colour_lo", "acc_colour_hi", "acc_type", "acc_type_lo", "acc_type_hi",
                  "fd", "kid", "kid_std", "guide_acc", "clip_acc", "sec_per_image"]
CEILING_COLUMNS = ["caption", "split", "n", "objects", "acc_caption", "acc_caption_lo", "acc_caption_hi", "acc_colour",
                   "acc_colour_lo", "acc_colour_hi", "acc_type", "acc_type_lo", "acc_type_hi"]
SUMMARY_COLUMNS = ["method", "scale", "n", "acc_caption", "acc_caption_lo", "acc_caption_hi", "acc_colour",
                   "acc_colour_lo", "acc_colour_hi", "acc_type", "acc_type_lo", "acc_type_hi", "fd", "kid",
                   "fd_mean", "kid_mean", "guide_acc", "clip_acc", "sec_per_image", "guided_steps"]


def slug(text: str) -> str:
    """A caption as a folder name: ``"a white jeep/bus"`` → ``a_white_jeep-bus``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "-")).strip("_") or "_"


def scale_name(scale: float) -> str:
    return f"{float(scale):g}"


def _values(hits: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(hits.cpu() if isinstance(hits, torch.Tensor) else hits, dtype=np.float64).ravel()


def _interval(mean: float, resampled: np.ndarray, level: float) -> tuple[float, float, float]:
    alpha = (1 - level) / 2
    return mean, float(np.quantile(resampled, alpha)), float(np.quantile(resampled, 1 - alpha))


def bootstrap_ci(hits: torch.Tensor | np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: int = 1) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap CI of the mean of per-sample values (NaN for no samples).

    ``groups`` > 1: the values are that many equal, consecutive strata (the captions of a pooled row) and each
    stratum is resampled on its own, as the design fixes how many samples each caption gets.
    """
    x = _values(hits)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    strata = x.reshape(groups, -1)
    k = strata.shape[1]
    picks = rng.integers(0, k, size=(resamples, groups, k))
    means = np.take_along_axis(strata[None].repeat(resamples, 0), picks, axis=2).mean(axis=(1, 2))
    return _interval(float(x.mean()), means, level)


def macro_bootstrap_ci(strata: Sequence[torch.Tensor | np.ndarray], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) of the mean over strata of each stratum's mean (every caption weighs the same, however many
    images it has); each stratum is resampled on its own."""
    xs = [x for x in map(_values, strata) if x.size]
    if not xs:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.mean([x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1) for x in xs], axis=0)
    return _interval(float(np.mean([x.mean() for x in xs])), means, level)


def _columns(ci) -> dict[str, float]:
    out = {}
    for part in ACC:
        mean, lo, hi = ci(part)
        out |= {f"acc_{part}": mean, f"acc_{part}_lo": lo, f"acc_{part}_hi": hi}
    return out


def accuracy_columns(hits: Mapping[str, torch.Tensor], resamples: int, seed: int, groups: int = 1) -> dict[str, float]:
    return _columns(lambda part: bootstrap_ci(hits[part], resamples, seed, groups=groups))


def macro_accuracy_columns(hits: Sequence[Mapping[str, torch.Tensor]], resamples: int, seed: int) -> dict[str, float]:
    """:func:`accuracy_columns` of strata of unequal sizes (one per caption), each caption weighing the same."""
    return _columns(lambda part: macro_bootstrap_ci([h[part] for h in hits], resamples, seed))


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> Path:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def caption_grid(images_by_caption: Mapping[str, torch.Tensor], per_row: int, path: Path) -> Path:
    """One labelled row per caption (its first ``per_row`` samples), upscaled to at least 64 px cells."""
    rows = [(c, to_uint8(x[:per_row])) for c, x in images_by_caption.items()]
    size = next(iter(images_by_caption.values())).shape[-1]
    return save_png(labelled_rows(rows, cell=max(64, size)), path)


def plot_accuracy_vs_scale(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Pooled judge accuracy (caption, colour) against the guidance scale, one line per guided method, with
    95% CI bars; the unguided rate as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100, sharey=True)
    for ax, part in zip(axes, ("caption", "colour")):
        for method in dict.fromkeys(r["method"] for r in summary):
            rs = sorted((r for r in summary if r["method"] == method), key=lambda r: r["scale"])
            y = np.array([r[f"acc_{part}"] for r in rs])
            err = np.array([[r[f"acc_{part}"] - r[f"acc_{part}_lo"] for r in rs],
                            [r[f"acc_{part}_hi"] - r[f"acc_{part}"] for r in rs]])
            if method == "none":
                ax.axhline(y[0], color="gray", ls="--", label="none (unguided)")
                continue
            ax.errorbar([r["scale"] for r in rs], y, yerr=err, marker="o", capsize=3, label=method)
        guided = [r["scale"] for r in summary if r["method"] != "none"]
        if guided and min(guided) > 0 and max(guided) / min(guided) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel("guidance scale")
        ax.set_title(f"judged {part} accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (95% CI)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def _pct(r: Mapping[str, Any], part: str) -> str:
    m, lo, hi = r[f"acc_{part}"], r[f"acc_{part}_lo"], r[f"acc_{part}_hi"]
    return "–" if math.isnan(m) else f"{100 * m:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def markdown_report(summary: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                    info: Mapping[str, Any], grids: Mapping[str, Path], plot: Path | None, out_dir: Path,
                    ceiling: Sequence[Mapping[str, Any]] = ()) -> Path:
    """``report.md``: settings, the pooled table, the judge on held-out real images (``ceiling``), the
    per-caption table, grids and the plot (relative links)."""
    base = next((r for r in summary if r["method"] == "none"), None)
    lines = [
        "# clipdiff evaluation",
        "",
        (f"- DDPM: `{info['ddpm_ckpt']}`; sampler {info['sampler']}; seed {info['seed']} "
        "(the same initial noise for every method and scale)"),
        f"- judge (never used for guidance): `{info['judge_ckpt']}`",
        f"- guides: {info['guides']}",
        (f"- captions ({len(info['captions'])}, {info['captions_from']}): {', '.join(info['captions'])}; "
        f"{info['num_per_caption']} samples each"),
        (f"- FD/KID against {info['real']}, in the feature space **{info['features']}**: per caption, and pooled "
        "(all samples of a row against the same number of real images of each caption). Comparable only within this "
        "space and sample size (small n biases FD upwards). Per-caption FD also measures whether a sample shows its "
        "caption, and the clean CLIP guide optimises this very feature space (the noisy CLIP starts from it), so "
        "guided FD is flattered: read it beside the grids and the judge's accuracy"),
        ("- accuracies: judge hits with 95% percentile-bootstrap CIs (pooled rows: stratified by caption); `guide acc` "
        "is the guiding model's own top-1 on the final samples (far above the judge's: the guide is fooled); "
        "`clip acc`: the clean CLIP's top-1"),
        "",
        "## All captions pooled",
        "",
        ("| method | scale | n | caption acc | colour acc | type acc | FD pooled | KID pooled | FD per caption (mean) "
        "| guide acc | clip acc | s/image | × unguided time |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        ratio = r["sec_per_image"] / base["sec_per_image"] if base and base["sec_per_image"] > 0 else math.nan
        lines.append(f"| {r['method']} | {scale_name(r['scale'])} | {r['n']} | {_pct(r, 'caption')} | "
                     f"{_pct(r, 'colour')} | {_pct(r, 'type')} | {_num(r['fd'])} | {_num(r['kid'])} | "
                     f"{_num(r['fd_mean'])} | {_num(r['guide_acc'], 2)} | {_num(r['clip_acc'], 2)} | "
                     f"{_num(r['sec_per_image'])} | {_num(ratio)} |")
    if ceiling:
        lines += ["", f"## The judge on held-out real images (`{ceiling[0]['split']}`, never seen in its training)", "",
                  ("What a sampler that drew real renders would score: the ceiling for the rows above. Images of one "
                   "object are alike, so the objects column says how much evidence a row holds."), "",
                  "| caption | images | objects | caption acc | colour acc | type acc |", "|---|---|---|---|---|---|"]
        for r in ceiling:
            acc = [_pct(r, p) if "acc_caption" in r else "–" for p in ACC]
            lines.append(f"| {r['caption']} | {r['n']} | {r['objects']} | {' | '.join(acc)} |")
    lines += ["", "## Per caption", "",
              "| method | scale | caption | n | caption acc | colour acc | type acc | FD | KID | guide acc |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {scale_name(r['scale'])} | {r['caption']} | {r['n']} | {_pct(r, 'caption')} "
                     f"| {_pct(r, 'colour')} | {_pct(r, 'type')} | {_num(r['fd'])} | {_num(r['kid'])} | "
                     f"{_num(r['guide_acc'], 2)} |")
    if plot is not None:
        lines += ["", "## Accuracy against guidance scale", "", f"![accuracy vs scale]({plot.relative_to(out_dir)})"]
    lines += ["", "## Samples (a row per caption)", ""]
    for name, path in grids.items():
        lines += [f"**{name}**", "", f"![{name}]({path.relative_to(out_dir)})", ""]
    lines += [("Sample PNGs: `samples/<method>/<scale>/<caption>/`. Per-row numbers: `results.csv`; pooled: "
              "`summary.csv`.")]
    path = out_dir / "report.md"
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def log_wandb(cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
              images: Mapping[str, Path], out_dir: Path, ceiling: Sequence[Mapping[str, Any]] = ()) -> str | None:
    """One wandb run (``cfg``: project, mode, group, name) with the tables, the pooled metrics, the judge on
    held-out real images (``ceiling``) and the images; returns the run's local directory."""
    import wandb

    run = wandb.init(project=cfg.get("project", "clipdiff"), mode=cfg.get("mode", "offline"), dir=str(out_dir),
                     group=cfg.get("group"), name=cfg.get("name"), job_type="evaluate", config=dict(cfg.get("config", {})),
                     reinit="finish_previous")
    try:
        run.log({"eval/results": wandb.Table(columns=RESULT_COLUMNS, data=[[_w(r.get(c)) for c in RESULT_COLUMNS] for r in rows]),
                 "eval/summary": wandb.Table(columns=SUMMARY_COLUMNS, data=[[_w(r.get(c)) for c in SUMMARY_COLUMNS] for r in summary]),
                 **{f"eval/{k}": wandb.Image(str(p)) for k, p in images.items()}})
        if ceiling:
            run.log({"eval/judge_real": wandb.Table(columns=CEILING_COLUMNS,
                                                    data=[[_w(r.get(c)) for c in CEILING_COLUMNS] for r in ceiling])})
            for r in ceiling:
                if r["caption"] == "all":
                    for part in ACC:
                        run.summary[f"eval/real_{r['split']}/acc_{part}"] = _w(r[f"acc_{part}"])
        for r in summary:
            for key in ("acc_caption", "acc_colour", "acc_type", "fd", "kid", "fd_mean", "guide_acc", "sec_per_image"):
                run.summary[f"eval/{r['method']}/s{scale_name(r['scale'])}/{key}"] = _w(r[key])
        return run.dir
    finally:
        run.finish()


def _w(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v
