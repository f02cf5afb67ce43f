"""The evaluation report: intervals, ``results.csv``, ``summary.csv``, grids, plots, ``report.md`` and the wandb run.

A *row* is one method × caption × scale (``RESULT_COLUMNS``); a *summary* pools the captions of one
method × scale (``SUMMARY_COLUMNS``). Accuracies are judge hits (per sample, bool) with Wilson 95% intervals;
the judge's ceiling on real renders has intervals over objects (:func:`clipdiff.eval.stats.clustered_proportion`);
a guided row's paired difference against unguided (``d_caption``: sample i of both rows shares its initial noise)
has Newcombe's paired interval (:func:`clipdiff.eval.stats.paired_difference`).
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

from clipdiff.eval.stats import clustered_proportion, paired_difference, wilson
from clipdiff.utils.images import labelled_rows, save_figure, save_png, to_uint8
from clipdiff.utils.io import atomic_open

ACC = ("caption", "colour", "type")
_ACC_COLUMNS = [f"acc_{p}{s}" for p in ACC for s in ("", "_lo", "_hi")]
RESULT_COLUMNS = ["method", "caption", "scale", "n", *_ACC_COLUMNS, "fd", "kid", "kid_std", "guide_acc", "clip_acc",
                  "sec_per_image", "refused"]
CEILING_COLUMNS = ["caption", "split", "n", "objects", *_ACC_COLUMNS, "refused"]
REALISM_COLUMNS = ["c2st_rgb", "c2st_rgb_lo", "c2st_rgb_hi", "c2st_grey", "c2st_grey_lo", "c2st_grey_hi", "fd_indep",
                   "kid_indep", "precision", "recall"]
SUMMARY_COLUMNS = ["method", "scale", "n", "is_default", *_ACC_COLUMNS, "refused", "acc_colour_raw", "acc_type_raw",
                   "d_caption", "d_caption_lo", "d_caption_hi", *REALISM_COLUMNS, "fd", "kid", "fd_mean", "kid_mean",
                   "guide_acc", "clip_acc", "eps_change_rms", "sec_per_image", "guided_steps"]
SANITY_COLUMNS = ["distortion", "strength", "fd_indep", "kid_indep"]
STEP_COLUMNS = ["method", "scale", "step", "steps", "t", "score", "grad_rms", "eps_shift_rms"]


def slug(text: str) -> str:
    """A caption as a folder name: ``"a white jeep/bus"`` → ``a_white_jeep-bus``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "-")).strip("_") or "_"


def scale_name(scale: float) -> str:
    return f"{float(scale):g}"


def accuracy_columns(hits: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``acc_<part>``, ``_lo``, ``_hi`` (Wilson 95%) of per-sample hits for caption, colour and type."""
    out = {}
    for part in ACC:
        h = torch.as_tensor(hits[part]).flatten()
        mean, lo, hi = wilson(float(h.sum()), len(h)) if len(h) else (math.nan,) * 3
        out |= {f"acc_{part}": mean, f"acc_{part}_lo": lo, f"acc_{part}_hi": hi}
    return out


def cluster_accuracy_columns(parts: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]]) -> dict[str, float]:
    """Accuracy columns of views pooled over ``parts`` (hits, object ids), with intervals over objects; ``refused``."""
    objects = torch.cat([o for _, o in parts]).numpy()
    out = {}
    for part in ACC:
        h = torch.cat([torch.as_tensor(hits[part]).flatten() for hits, _ in parts]).numpy()
        if len(np.unique(objects)) < 2:
            mean, lo, hi = wilson(float(h.sum()), len(h))
        else:
            got = clustered_proportion(h, objects)
            mean, lo, hi = got["p"], got["lo"], got["hi"]
        out |= {f"acc_{part}": mean, f"acc_{part}_lo": lo, f"acc_{part}_hi": hi}
    out["refused"] = float(torch.cat([hits["refused"].float().flatten() for hits, _ in parts]).mean())
    return out


def add_paired_differences(summary: Sequence[dict[str, Any]], hits_of: Mapping[tuple[str, float], Mapping],
                           part: str = "caption") -> None:
    """``d_<part>`` (+ ``_lo``/``_hi``) on every guided summary row: its hit rate minus the unguided row's, sample
    by sample (the same initial noise), with Newcombe's paired interval. Unguided and rows without a pair: NaN."""
    base = hits_of.get(("none", 0.0))
    for r in summary:
        d = {"diff": math.nan, "lo": math.nan, "hi": math.nan}
        if base is not None and r["method"] != "none":
            d = paired_difference(hits_of[(r["method"], r["scale"])][part].numpy(), base[part].numpy())
        r |= {f"d_{part}": d["diff"], f"d_{part}_lo": d["lo"], f"d_{part}_hi": d["hi"]}


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


def pct(r: Mapping[str, Any], part: str) -> str:
    m, lo, hi = r.get(f"{part}", math.nan), r.get(f"{part}_lo", math.nan), r.get(f"{part}_hi", math.nan)
    return "–" if _nan(m) else f"{100 * m:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _signed(r: Mapping[str, Any], key: str) -> str:
    m, lo, hi = r.get(key, math.nan), r.get(f"{key}_lo", math.nan), r.get(f"{key}_hi", math.nan)
    return "–" if _nan(m) else f"{100 * m:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}]"


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: Any, digits: int = 3) -> str:
    return "–" if _nan(v) else f"{v:.{digits}g}"


def share(v: Any) -> str:
    return "–" if _nan(v) else f"{100 * v:.0f}%"


def _c2st(r: Mapping[str, Any], key: str) -> str:
    m = r.get(key, math.nan)
    return "–" if _nan(m) else f"{m:.2f} [{r[key + '_lo']:.2f}, {r[key + '_hi']:.2f}]"


def summary_lines(summary: Sequence[Mapping[str, Any]], floor: Mapping[str, Any] | None) -> list[str]:
    """The pooled table: judged accuracy beside realism, the real-against-real floor last."""
    lines = [("| method | scale | default | caption acc | Δ caption vs unguided | colour acc | type acc | refused | "
             "c2st grey | c2st rgb | FD (realism net) | precision | recall | s/image |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {scale_name(r['scale'])} | {'**yes**' if r.get('is_default') else ''} | "
                     f"{pct(r, 'acc_caption')} | {_signed(r, 'd_caption')} | {pct(r, 'acc_colour')} | "
                     f"{pct(r, 'acc_type')} | {share(r.get('refused'))} | {_c2st(r, 'c2st_grey')} | "
                     f"{_c2st(r, 'c2st_rgb')} | {_num(r.get('fd_indep'))} | {_num(r.get('precision'), 2)} | "
                     f"{_num(r.get('recall'), 2)} | {_num(r.get('sec_per_image'))} |")
    if floor:
        lines.append(f"| real vs real | – | | – | – | – | – | – | {_c2st(floor, 'c2st_grey')} | {_c2st(floor, 'c2st_rgb')} "
                     f"| {_num(floor.get('fd_indep'))} | {_num(floor.get('precision'), 2)} | "
                     f"{_num(floor.get('recall'), 2)} | – |")
    return lines


def markdown_report(summary: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                    info: Mapping[str, Any], grids: Mapping[str, Path], plots: Mapping[str, Path], out_dir: Path,
                    ceiling: Sequence[Mapping[str, Any]] = (), controls: Sequence[Mapping[str, Any]] = (),
                    sanity: Sequence[Mapping[str, Any]] = ()) -> Path:
    """``report.md``: settings, the pooled table with realism, the front, the judge's ceiling and controls, the
    predicted types, the realism check, the per-caption table and the grids (relative links)."""
    d = info["default"]
    chosen = ", ".join(f"{m} {'none within the tolerance' if s is None else f'scale {s:g}'}"
                       for m, s in info["defaults"].items()) or "no guided method"
    lines = [
        "# clipdiff evaluation",
        "",
        (f"- DDPM: `{info['ddpm_ckpt']}`; sampler {info['sampler']}; seed {info['seed']} "
         "(the same initial noise for every method and scale: sample i of every row is a pair)"),
        f"- guides: {info['guides']}",
        (f"- captions ({len(info['captions'])}, {info['captions_from']}): {', '.join(info['captions'])}; "
         f"{info['num_per_caption']} samples each"),
        (f"- judge (never used for guidance): `{info['judge_ckpt']}`. Body type from grey images, colour separately; "
         "a sample it does not take for a car render is *refused* and wrong on every attribute. Intervals: Wilson 95%; "
         "Δ caption: paired difference against unguided with Newcombe's 95% interval"),
        (f"- realism against held-out real renders (no model trained on them): the unguided row against "
         f"{info['mix']} (the unconditional mix), guided rows against {info['by_caption']} images of their target "
         "captions. c2st: a fresh small CNN per fold tells samples from real renders (0.5: indistinguishable; "
         f"grey: shape alone). FD/precision/recall in **{info['realism']}**, a space no guide or caption classifier "
         "shares. The last row is real against real: the floor"),
        (f"- defaults: each guided method's most accurate scale whose {d['measure']} stays within {d['tolerance']} "
         f"of unguided: {chosen}"),
        "",
        "## All captions pooled",
        "",
        *summary_lines(summary, info.get("floor")),
    ]
    for key, title in (("front", "Accuracy against realism (the front)"),
                       ("eps_change", "How hard each setting pushed: RMS change of eps per step"),
                       ("accuracy_vs_scale", "Accuracy against guidance scale")):
        if key in plots:
            lines += ["", f"## {title}", "", f"![{key}]({plots[key].relative_to(out_dir)})"]
    if ceiling:
        lines += ["", f"## The judge on held-out real renders ({ceiling[0]['split']})", "",
                  ("What a sampler that drew real renders would score: the ceiling for the rows above. Intervals are "
                   "over objects (views of one object are alike)."), "",
                  "| caption | images | objects | caption acc | colour acc | type acc | refused |", "|---|---|---|---|---|---|---|"]
        for r in ceiling:
            acc = [pct(r, f"acc_{p}") if "acc_caption" in r else "–" for p in ACC]
            lines.append(f"| {r['caption']} | {r['n']} | {r['objects']} | {' | '.join(acc)} | {share(r.get('refused'))} |")
    if controls:
        lines += ["", "## The judge on images that are not car renders", "",
                  ("It should refuse them (`passed` low) while it passes held-out real renders; type and colour before "
                   "refusal show what a judge that cannot refuse would have credited, against the majority-type "
                   "baseline (always naming the commonest body type of the targets)."), "",
                  "| set | n | passed | type before refusal | colour before refusal | caption (judged) | majority type |",
                  "|---|---|---|---|---|---|---|"]
        for r in controls:
            lines.append(f"| {r['set']} | {r['n']} | {share(r['passed'])} | {share(r['type_raw'])} | "
                         f"{share(r['colour_raw'])} | {share(r['caption'])} | {share(r['majority_type'])} |")
    types = info.get("types") or []
    if types:
        names = [k for k in types[0] if k.startswith("pred_")]
        lines += ["", "## Body types the judge sees", "",
                  ("Share of each body type the colour-blind type net names in each row's samples, refused ones "
                   f"included; always naming the commonest type of the targets scores {share(types[0]['majority_type'])}."),
                  "", "| method | scale | passed | " + " | ".join(n[5:] for n in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for r in types:
            lines.append(f"| {r['method']} | {scale_name(r['scale'])} | {share(r['passed'])} | "
                         + " | ".join(share(r[n]) for n in names) + " |")
    if sanity:
        failures = info.get("sanity_failures") or []
        verdict = ("**It does not here:** " + "; ".join(failures)) if failures else "It does here."
        strengths = sorted({r["strength"] for r in sanity})
        lines += ["", "## Does the realism measure measure realism?", "",
                  ("Held-out real renders under graded distortions against other held-out real renders (disjoint "
                   "objects): FD in the realism net's space must rise with the strength of noise, blur, patch shuffle, "
                   f"flat silhouettes and colour blobs, and a hue shift (shape kept) must raise it least. {verdict}"),
                  "", "| distortion | " + " | ".join(f"FD at {s:g}" for s in strengths) + " |",
                  "|---|" + "---|" * len(strengths)]
        for name in dict.fromkeys(r["distortion"] for r in sanity):
            fd = {r["strength"]: r["fd_indep"] for r in sanity if r["distortion"] == name}
            lines.append(f"| {name} | " + " | ".join(_num(fd.get(s)) for s in strengths) + " |")
    lines += ["", "## Per caption", "",
              "| method | scale | caption | n | caption acc | colour acc | type acc | refused | FD (clean CLIP) | guide acc |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {scale_name(r['scale'])} | {r['caption']} | {r['n']} | {pct(r, 'acc_caption')} "
                     f"| {pct(r, 'acc_colour')} | {pct(r, 'acc_type')} | {share(r.get('refused'))} | {_num(r['fd'])} | "
                     f"{_num(r['guide_acc'], 2)} |")
    lines += ["", (f"FD (clean CLIP) is in {info['clip_space']}, the clean CLIP guide's own space (the noisy CLIP starts "
                   "from it): it flatters guided rows and is kept only beside older runs; read realism above."),
              "", "## Samples (a row per caption)", ""]
    for name, path in grids.items():
        lines += [f"**{name}**", "", f"![{name}]({path.relative_to(out_dir)})", ""]
    lines += [("Sample PNGs: `samples/<method>/<scale>/<caption>/`. Per-row numbers: `results.csv`; pooled: "
               "`summary.csv`; per step: `steps.csv`.")]
    path = out_dir / "report.md"
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def log_wandb(cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
              images: Mapping[str, Path], out_dir: Path, ceiling: Sequence[Mapping[str, Any]] = (),
              steps: Sequence[Mapping[str, Any]] = ()) -> str | None:
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
        if steps:
            run.log({"eval/steps": wandb.Table(columns=STEP_COLUMNS,
                                               data=[[_w(r.get(c)) for c in STEP_COLUMNS] for r in steps])})
        if ceiling:
            run.log({"eval/judge_real": wandb.Table(columns=CEILING_COLUMNS,
                                                    data=[[_w(r.get(c)) for c in CEILING_COLUMNS] for r in ceiling])})
            for r in ceiling:
                if r["caption"] == "all":
                    for part in ACC:
                        run.summary[f"eval/real/acc_{part}"] = _w(r[f"acc_{part}"])
        for r in summary:
            for key in ("acc_caption", "acc_colour", "acc_type", "refused", "d_caption", "c2st_grey", "c2st_rgb",
                        "fd_indep", "precision", "recall", "guide_acc", "eps_change_rms", "sec_per_image"):
                run.summary[f"eval/{r['method']}/s{scale_name(r['scale'])}/{key}"] = _w(r.get(key))
        return run.dir
    finally:
        run.finish()


def _w(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v
