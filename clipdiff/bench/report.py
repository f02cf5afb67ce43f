"""The table: printed, written as ``<out>/<timestamp>.csv`` + ``<out>/latest.csv`` (+ ``latest.json``: command, threads,
machine, load), and copied into README.md between the bench-results markers."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from clipdiff.bench.common import COLUMNS, Claim
from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def write(claims: list[Claim], out: Path, info: dict, stem: str = "latest") -> Path:
    """``<out>/<stem>.csv`` (+ ``<stem>.json``: command, threads, machine, load) and a dated copy of the csv."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    dated = f"{stamp}.csv" if stem == "latest" else f"{stamp}-{stem}.csv"
    for path in (out / dated, out / f"{stem}.csv"):
        with atomic_open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(c.row() for c in claims)
    with atomic_open(out / f"{stem}.json", "w") as f:
        json.dump({**info, "stamp": stamp}, f, indent=1)
    return out / f"{stem}.csv"


def table(rows: list[dict[str, str]]) -> str:
    width = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("name", "value", "goal", "holds")}
    head = f"{'name':{width['name']}s}  {'value':>{width['value']}s}  {'goal':>{width['goal']}s}  " \
           f"{'holds':{width['holds']}s}  unit"
    return "\n".join([head] + [f"{r['name']:{width['name']}s}  {r['value']:>{width['value']}s}  "
                               f"{r['goal']:>{width['goal']}s}  {r['holds']:{width['holds']}s}  {r['unit']}"
                               for r in rows])


def markdown(rows: list[dict[str, str]], info: dict) -> str:
    lines = [(f"Produced by `{info['command']}` on {info['stamp']} ({info['machine']}; torch threads "
             f"{info['threads']}; load average {info['load_start']:.2f} at the start, {info['load_end']:.2f} at the end). "
             + info.get("note", "Ratios are measured side by side in one process; rows without a goal are context.")), "",
             "| name | value | goal | holds | unit |", "| --- | ---: | ---: | :---: | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['value']} | {r['goal']} | {r['holds']} | {r['unit']} |")
    return "\n".join(lines)


def update_readme(out: Path, readme: Path = Path("README.md"), stem: str = "latest",
                  markers: tuple[str, str] = (START, END)) -> Path:
    """Replace the README's block between ``markers`` with ``<out>/<stem>.csv`` and its ``<stem>.json``."""
    csv_path, info_path = out / f"{stem}.csv", out / f"{stem}.json"
    if not csv_path.is_file() or not info_path.is_file():
        raise ClipdiffError(f"{csv_path} (and {stem}.json) not found: run the benchmark first")
    text = readme.read_text()
    start, end = markers
    if start not in text or end not in text:
        raise ClipdiffError(f"{readme} has no '{start}' … '{end}' block to fill")
    rows = list(csv.DictReader(csv_path.open()))
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with atomic_open(readme, "w") as f:
        f.write(f"{head}{start}\n{markdown(rows, json.loads(info_path.read_text()))}\n{end}{tail}")
    return readme
