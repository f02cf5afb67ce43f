"""Put a demo's results into the README: ``python -m clipdiff.eval.readme [outputs/latest_demo]``.

Replaces the block between ``<!-- demo-results:start -->`` and ``<!-- demo-results:end -->`` in README.md with
the pooled table of the run's evaluation (``summary.csv``, accuracy beside realism), the judge's ceiling and
controls, and copies the front plot and the grids of the unguided and each method's default setting to
``docs/demo/``, so the README shows what the command produced rather than pasted numbers.

``--spread outputs/aggregate/<run>/spread.md`` (what ``make seeds`` ends with) also fills the block between
``<!-- seed-spread:start -->`` and ``<!-- seed-spread:end -->`` with that table: every summary column's mean ± sample
standard deviation over the training seeds.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
SPREAD_START, SPREAD_END = "<!-- seed-spread:start -->", "<!-- seed-spread:end -->"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV's rows with numbers as floats (empty cells NaN) and ``is_default`` as a bool."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        for k, v in r.items():
            if k == "is_default":
                row[k] = v.lower() == "true"
                continue
            try:
                row[k] = float(v) if v != "" else math.nan
            except ValueError:
                row[k] = v
        out.append(row)
    return out


def timing(run: Path) -> str:
    """"make demo took N min …" from the pipeline's log (stage and total wall times), or "" without a log."""
    log = run / "pipeline.log"
    text = log.read_text() if log.is_file() else ""
    total = re.search(r"pipeline finished in (\d+) s(?: on (\d+) CPUs)?", text)
    if not total:
        return ""
    stages = re.findall(r"\[(\w+)\] (?:done in (\d+) s|(reused))", text)
    parts = ", ".join(f"{name} {'reused' if reused else secs + ' s'}" for name, secs, reused in stages)
    cpus = f" on {total.group(2)} CPUs" if total.group(2) else ""
    return f"The run took {int(total.group(1)) / 60:.1f} min wall{cpus} (stages: {parts}). "


def _copy(src: Path, docs: Path, name: str, readme_dir: Path) -> str | None:
    if not src.is_file():
        return None
    target = docs / name
    shutil.copyfile(src, target)
    return Path(os.path.relpath(target.resolve(), readme_dir)).as_posix()


def results_block(run: Path, docs: Path, readme_dir: Path) -> str:
    from clipdiff.eval import report  # imports torch: here, not at import, so that `--help` answers at once

    evaluation = run / "evaluate"
    summary = evaluation / "summary.csv"
    if not summary.is_file():
        raise ClipdiffError(f"{summary} does not exist: run `make demo` first (or give a pipeline run directory)")
    rows = read_rows(summary)
    floor_csv = evaluation / "real_vs_real.csv"
    floor = read_rows(floor_csv)[0] if floor_csv.is_file() else None
    lines = report.summary_lines(rows, floor)
    ceiling = [r for r in (read_rows(evaluation / "judge_real.csv") if (evaluation / "judge_real.csv").is_file() else [])
               if r["caption"] == "all"]
    notes = []
    for r in ceiling:
        notes.append(f"The judge on held-out real renders of the same captions (the ceiling): caption "
                     f"{report.pct(r, 'acc_caption')}, colour {report.pct(r, 'acc_colour')}, type "
                     f"{report.pct(r, 'acc_type')}, refused {report.share(r.get('refused'))} "
                     f"({int(r['n'])} images of {int(r['objects'])} objects; intervals over objects).")
    controls = read_rows(evaluation / "controls.csv") if (evaluation / "controls.csv").is_file() else []
    if controls:
        notes.append("The judge passes " + ", ".join(f"{report.share(r['passed'])} of {r['set']}" for r in controls)
                     + " (`controls.csv`).")
    docs.mkdir(parents=True, exist_ok=True)
    pictures = []
    for method in dict.fromkeys(r["method"] for r in rows):
        candidates = [r for r in rows if r["method"] == method]
        pick = candidates[0] if method == "none" else next((r for r in candidates if r.get("is_default")), None)
        if pick is None:
            continue
        scale = report.scale_name(pick["scale"])
        src = _copy(evaluation / "grids" / f"{method}_s{scale}.png", docs, f"{method}.png", readme_dir)
        if src:
            label = "unguided" if method == "none" else f"default, scale {scale}"
            pictures.append(f'<b>{method}</b> ({label})<br><img src="{src}" width="300">')
    front = _copy(evaluation / "front.png", docs, "front.png", readme_dir)
    when = run.resolve().name
    return "\n".join([
        (f"Produced by `make demo` (run `{when}`; `python -m clipdiff.eval.readme` copied it here). {timing(run)}"
         "Judged accuracy with Wilson 95% intervals; Δ caption: the paired difference against unguided (the same "
         "initial noise) with Newcombe's interval; realism against held-out real renders: c2st (0.5 = "
         "indistinguishable, grey = shape alone) and FD/precision/recall in the realism net's space; the last row is "
         "real against real. A default row is each method's most accurate scale whose c2st grey stays within 0.05 "
         "of unguided."),
        "", *lines, "", *notes, "",
        *([f'<img src="{front}" width="640">', ""] if front else []),
        "<table><tr>" + "".join(f"<td>{p}</td>" for p in pictures) + "</tr></table>",
    ])


def spread_block(spread_md: Path) -> str:
    """The seed-spread table of ``clipdiff.aggregate … spread_over=seed`` with where it came from."""
    if not spread_md.is_file():
        raise ClipdiffError(f"{spread_md} does not exist: run `make seeds` first (it ends with "
                            "`python -m clipdiff.aggregate … spread_over=seed`, which writes spread.md)")
    lines = spread_md.read_text().splitlines()
    title = lines[0].lstrip("# ") if lines and lines[0].startswith("#") else ""
    table = [line for line in lines if line.startswith("|")]
    if not table:
        raise ClipdiffError(f"{spread_md} holds no table: give the spread.md of `clipdiff.aggregate … spread_over=seed`")
    source = (f"Produced by `make seeds` (`python -m clipdiff.eval.readme --spread {spread_md}` copied it "
              f"here). {title}.")
    return "\n".join([source, "", *table])


def replace_block(text: str, start: str, end: str, block: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise ClipdiffError(f"{readme} has no '{start}' … '{end}' block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="outputs/latest_demo", help="a pipeline run directory")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--docs", default="docs/demo")
    ap.add_argument("--spread", default=None, help="spread.md of `make seeds`: fills the seed-spread block too")
    args = ap.parse_args(argv)
    try:
        readme = Path(args.readme)
        text = readme.read_text()
        if args.spread:  # checked before anything is copied: a bad --spread leaves docs/ and the README alone
            text = replace_block(text, SPREAD_START, SPREAD_END, spread_block(Path(args.spread)), readme)
        block = results_block(Path(args.run), Path(args.docs), readme.resolve().parent)
        text = replace_block(text, START, END, block, readme)
        with atomic_open(readme, "w") as f:
            f.write(text)
    except ClipdiffError as e:
        print(f"clipdiff: error: {e}", file=sys.stderr)
        return 2
    print(f"updated {args.readme} from {args.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
