"""One table over a Hydra sweep: ``python -m clipdiff.aggregate sweep_dir=outputs/<task>/multiruns/<timestamp>``.

Every job directory of the sweep (``<sweep_dir>/<n>/`` with ``.hydra/overrides.yaml``) gives rows, with the job's
overrides as columns (``guidance.scale``, ``model.optimizer.lr``, …) and its number and directory:

- ``clipdiff.evaluate`` jobs: their ``summary.csv`` rows (one per method × scale, captions pooled);
- ``clipdiff.pipeline`` jobs: the ``summary.csv`` rows of their evaluation (``<job>/evaluate/``);
- ``clipdiff.train`` jobs (grid or Optuna sweeps): the last logged value of every metric in ``csv/metrics.csv``;
- ``clipdiff.sample`` jobs: what ``sample.json`` says was run (guidance, scale, prompt, sampler).

Writes ``aggregate.csv``, ``aggregate.md`` and, where rows carry both a judged accuracy and an FD,
``accuracy_vs_fd.png`` (a line per method and setting through its scales) into this command's run directory.

``spread_over=seed`` (e.g. over ``python -m clipdiff.pipeline -m seed=0,1,2 …``) also writes ``spread.csv`` and
``spread.md``: every numeric column's mean, sample standard deviation, min and max over the jobs that differ only in
that override, a row per method × scale, and the default rows (``is_default``) of each method however their scale
varies between jobs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from clipdiff.errors import ClipdiffError
from clipdiff.utils.cli import hydra_entry
from clipdiff.utils.io import atomic_open

log = logging.getLogger("clipdiff.aggregate")

SCALE_KEYS = ("scale", "guidance.scale", "scales")  # what varies along a line of the plot


def job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        raise ClipdiffError(f"sweep_dir={sweep_dir} does not exist (give outputs/<task>/multiruns/<timestamp>)")
    jobs = [d for d in sweep_dir.iterdir() if d.name.isdigit() and (d / ".hydra" / "overrides.yaml").is_file()]
    if not jobs:
        raise ClipdiffError(f"sweep_dir={sweep_dir} is not a Hydra multirun directory (no <n>/.hydra/overrides.yaml); "
                            "give outputs/<task>/multiruns/<timestamp> of a `-m` run")
    return sorted(jobs, key=lambda d: int(d.name))


def overrides(job: Path) -> dict[str, str]:
    """``key=value`` overrides of one job (``+``/``++`` prefixes dropped; ``~key`` deletions as ``key: deleted``)."""
    out = {}
    for item in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []:
        key, _, value = str(item).partition("=")
        if key.startswith("~"):
            key, value = key[1:], "deleted"
        out[key.lstrip("+")] = value
    return out


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return [{k: _number(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def last_logged(path: Path) -> dict[str, Any]:
    """The last non-empty value of every column of a Lightning CSVLogger ``metrics.csv``."""
    last: dict[str, Any] = {}
    for row in read_csv(path):
        last.update({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
    return last


def job_rows(job: Path) -> tuple[str, list[dict[str, Any]]]:
    """(kind, rows) of one job directory."""
    if (job / "summary.csv").is_file():
        return "evaluate", read_csv(job / "summary.csv")
    if (job / "evaluate" / "summary.csv").is_file():
        return "pipeline", read_csv(job / "evaluate" / "summary.csv")
    if (job / "csv" / "metrics.csv").is_file():
        return "train", [last_logged(job / "csv" / "metrics.csv")]
    if (job / "sample.json").is_file():
        info = json.loads((job / "sample.json").read_text())
        guidance, sampler = info.get("guidance") or {}, info.get("sampler") or {}
        return "sample", [{"guidance": guidance.get("name", "none"), "scale": guidance.get("scale", 0.0),
                           "prompt": info.get("prompt"), "sampler": sampler.get("name"), "steps": sampler.get("steps"),
                           "num_samples": info.get("num_samples"), "seed": info.get("seed"), "grid": info.get("grid")}]
    return "none", [{"status": "no results (failed or still running?)"}]


def aggregate(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows, columns, override keys) over every job of the sweep."""
    rows, keys, result_cols = [], {}, {}
    for job in job_dirs(sweep_dir):
        over = overrides(job)
        keys.update(dict.fromkeys(over))
        kind, found = job_rows(job)
        for r in found:
            result_cols.update(dict.fromkeys(r))
            rows.append({**over, "job": int(job.name), "kind": kind, **r, "dir": job.name})
    columns = [*keys, "job", "kind", *(c for c in result_cols if c not in keys), "dir"]
    return rows, columns, list(keys)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_tables(rows: list[dict[str, Any]], columns: list[str], out_dir: Path, title: str,
                 plot: Path | None = None) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "aggregate.csv", out_dir / "aggregate.md"
    with atomic_open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    if plot is not None:
        lines += ["", f"![accuracy vs FD]({plot.name})"]
    with atomic_open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_accuracy_vs_fd(rows: list[dict[str, Any]], override_keys: list[str], path: Path) -> Path | None:
    """Judged caption accuracy against pooled FD: a line per method and setting (the overrides that are not a
    scale), through its scales (each point labelled); None when no row has both numbers."""
    points = [r for r in rows if _finite(r.get("acc_caption")) and _finite(r.get("fd"))]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from clipdiff.utils.images import save_figure

    varying = [k for k in override_keys if k not in SCALE_KEYS and len({str(r.get(k)) for r in points}) > 1]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        method = str(r.get("method", r.get("guidance", "")))
        label = "none (unguided)" if method == "none" else " ".join([method, *(f"{k}={r.get(k)}" for k in varying)])
        lines.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for label, rs in lines.items():
        rs.sort(key=lambda r: float(r.get("scale", 0) or 0))
        ax.plot([r["fd"] for r in rs], [r["acc_caption"] for r in rs], marker="o", label=label)
        for r in rs:
            ax.annotate(f"s={_cell(r.get('scale', ''))}", (r["fd"], r["acc_caption"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("FD (pooled, lower is closer to the real images)")
    ax.set_ylabel("judged caption accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("accuracy against FD across guidance scales")
    return save_figure(fig, path)


SPREAD_SHOWN = ("acc_caption", "acc_colour", "acc_type", "refused", "c2st_grey", "c2st_rgb", "fd_indep", "precision",
                "recall")  # the columns spread.md shows (spread.csv has every numeric one)


def spread(rows: list[dict[str, Any]], override_keys: list[str], over: str) -> list[dict[str, Any]]:
    """Mean, sample std, min, max and t-interval (:func:`clipdiff.eval.stats.seed_spread`) of every numeric column
    over the jobs that differ only in ``over``: a row per
    setting × method × scale, then a row per setting × method for the default rows (``is_default``), whose
    ``scale`` lists the scales the jobs chose."""
    from clipdiff.eval.stats import seed_spread

    fixed = [k for k in override_keys if k != over]
    skip = {*override_keys, "job", "kind", "dir", "n", "scale", "is_default"}

    def summarise(key: dict[str, Any], members: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**key, "jobs": len(members), over: " ".join(str(m.get(over)) for m in members)}
        for col in dict.fromkeys(c for m in members for c in m if c not in skip):
            vals = [m[col] for m in members if _finite(m.get(col))]
            if not vals or len(vals) < len(members):
                continue
            got = seed_spread(vals)
            out |= {f"{col}_{k}": got[k] for k in ("mean", "std", "min", "max", "lo", "hi")}
        return out

    groups: dict[tuple, list[dict[str, Any]]] = {}
    defaults: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "method" not in r:
            continue
        setting = tuple(str(r.get(k)) for k in fixed)
        groups.setdefault((*setting, r["method"], r.get("scale")), []).append(r)
        if str(r.get("is_default")).lower() in ("true", "1"):
            defaults.setdefault((*setting, r["method"]), []).append(r)
    out = [summarise({**dict(zip(fixed, key)), "method": key[-2], "scale": key[-1]}, members)
           for key, members in groups.items()]
    out += [summarise({**dict(zip(fixed, key)), "method": f"{key[-1]} (default)",
                       "scale": " ".join(f"{m['scale']:g}" for m in members)}, members)
            for key, members in defaults.items()]
    return out


def write_spread(rows: list[dict[str, Any]], out_dir: Path, over: str, title: str) -> tuple[Path, Path]:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    csv_path, md_path = out_dir / "spread.csv", out_dir / "spread.md"
    with atomic_open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    shown = [c for c in SPREAD_SHOWN if any(f"{c}_mean" in r for r in rows)]
    keys = [c for c in columns if not c.endswith(("_mean", "_std", "_min", "_max", "_lo", "_hi")) and c not in ("jobs", over)]
    lines = [f"# {title}: mean ± sample std over {over} (min–max in spread.csv)", "",
             "| " + " | ".join([*keys, "jobs", *shown]) + " |", "|" + "---|" * (len(keys) + 1 + len(shown))]
    for r in rows:
        cells = [_cell(r.get(k)) for k in keys] + [str(r.get("jobs", ""))]
        cells += [f"{r[c + '_mean']:.3f} ± {r[c + '_std']:.3f}" if c + "_mean" in r else "–" for c in shown]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    with atomic_open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("sweep_dir"):
        raise ClipdiffError("sweep_dir is required: python -m clipdiff.aggregate sweep_dir=outputs/<task>/multiruns/<ts>")
    sweep_dir = Path(str(cfg.sweep_dir))
    rows, columns, keys = aggregate(sweep_dir)
    out_dir = Path(str(cfg.paths.run_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_accuracy_vs_fd(rows, keys, out_dir / "accuracy_vs_fd.png")
    csv_path, md_path = write_tables(rows, columns, out_dir, f"Sweep {sweep_dir}", plot)
    result = {"rows": rows, "columns": columns, "csv": csv_path, "markdown": md_path, "plot": plot, "run_dir": out_dir,
              "spread": None}
    over = cfg.get("spread_over")
    if over:
        if over not in keys:
            raise ClipdiffError(f"spread_over={over}: the sweep's jobs do not vary it (their overrides: {', '.join(keys)})")
        result["spread_rows"] = spread(rows, keys, str(over))
        result["spread"] = write_spread(result["spread_rows"], out_dir, str(over), f"Sweep {sweep_dir}")[1]
    return result


@hydra_entry("aggregate")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(f"{len(result['rows'])} rows from {cfg.sweep_dir}")
    for key in ("csv", "markdown", "plot", "spread"):
        if result[key] is not None:
            print(f"{key}: {result[key]}")


if __name__ == "__main__":
    main()
