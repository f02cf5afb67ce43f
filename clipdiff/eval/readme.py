"""Put a demo's results into the README: ``python -m clipdiff.eval.readme [outputs/latest_demo]``.

Replaces the block between ``<!-- demo-results:start -->`` and ``<!-- demo-results:end -->`` in README.md with
the pooled table of the run's evaluation (``summary.csv``) and copies its grids for the unguided and the best
guided settings to ``docs/demo/``, so the README shows what the command produced rather than pasted numbers.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path

from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def pct(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    ci = f" [{float(lo):.0%}, {float(hi):.0%}]" if lo not in (None, "") and hi not in (None, "") else ""
    return f"{float(row[key]):.0%}{ci}"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


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


def results_block(run: Path, docs: Path, readme_dir: Path) -> str:
    evaluation = run / "evaluate"
    summary = evaluation / "summary.csv"
    if not summary.is_file():
        raise ClipdiffError(f"{summary} does not exist: run `make demo` first (or give a pipeline run directory)")
    rows = read_rows(summary)
    lines = ["| method | scale | n | caption acc | colour acc | type acc | FD | KID | guide acc | s/image |",
             "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        guide = f"{float(r['guide_acc']):.2f}" if r.get("guide_acc") else "–"
        lines.append(f"| {r['method']} | {r['scale']} | {r['n']} | {pct(r, 'acc_caption')} | {pct(r, 'acc_colour')} | "
                     f"{pct(r, 'acc_type')} | {float(r['fd_mean']):.3g} | {float(r['kid_mean']):.3g} | {guide} | "
                     f"{float(r['sec_per_image']):.2f} |")
    ceiling = read_rows(evaluation / "judge_real.csv") if (evaluation / "judge_real.csv").is_file() else []
    pooled = [r for r in ceiling if r["caption"] == "all"]
    missing = [r["caption"] for r in ceiling if r["caption"] != "all" and r["n"] == "0"]
    mark = "\\*" if missing else ""
    for r in pooled:  # the judge on held-out real renders: what a sampler drawing real cars would score
        lines.append(f"| real `{r['split']}` images{mark} | – | {r['n']} | {pct(r, 'acc_caption')} | "
                     f"{pct(r, 'acc_colour')} | {pct(r, 'acc_type')} | – | – | – | – |")
    if pooled and missing:
        lines += ["", f"\\* averaged over the captions with `{pooled[0]['split']}` images; none of: {', '.join(missing)}."]
    docs.mkdir(parents=True, exist_ok=True)
    pictures = []
    for method in ("none", "clip", "noisy_clip"):
        candidates = [r for r in rows if r["method"] == method]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: float(r["acc_caption"]))
        scale = best["scale"]
        grid = evaluation / "grids" / f"{method}_s{scale}.png"
        if grid.is_file():
            target = docs / f"{method}.png"
            shutil.copyfile(grid, target)
            pictures.append(f'<b>{method}</b> (scale {scale})<br><img src="{Path(os.path.relpath(target.resolve(), readme_dir)).as_posix()}" width="300">')
    when = run.resolve().name
    return "\n".join([
        (f"Produced by `make demo` (run `{when}`; `python -m clipdiff.eval.readme` copied it here). {timing(run)}"
        f"Judge accuracy with bootstrap 95% CIs; FD/KID per caption in the clean CLIP's feature space, averaged"
        f"{'; the last row is the judge on held-out real renders of the same captions, the ceiling' if pooled else ''}."),
        "", *lines, "", "<table><tr>" + "".join(f"<td>{p}</td>" for p in pictures) + "</tr></table>",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="outputs/latest_demo", help="a pipeline run directory")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--docs", default="docs/demo")
    args = ap.parse_args(argv)
    try:
        readme = Path(args.readme)
        text = readme.read_text()
        if START not in text or END not in text:
            raise ClipdiffError(f"{readme} has no '{START}' … '{END}' block to fill")
        block = results_block(Path(args.run), Path(args.docs), readme.resolve().parent)
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        with atomic_open(readme, "w") as f:
            f.write(f"{head}{START}\n{block}\n{END}{tail}")
    except ClipdiffError as e:
        print(f"clipdiff: error: {e}", file=sys.stderr)
        return 2
    print(f"updated {args.readme} from {args.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
