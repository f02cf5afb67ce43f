"""``make bench`` writes its table with the documented columns (speed itself is never asserted in tests)."""

from __future__ import annotations

import csv
from pathlib import Path

from clipdiff import bench


def test_bench_writes_latest_csv(tmp_path: Path):
    out = tmp_path / "bench"
    assert bench.main(["--objects", "4", "--views", "2", "--sizes", "16", "--budget", "0.2",
                       "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    rows = list(csv.DictReader((out / "latest.csv").open()))
    assert list(rows[0]) == bench.COLUMNS
    ratio = next(r for r in rows if r["name"] == "data/cache_vs_png@16px")
    assert float(ratio["value"]) > 0 and ratio["goal"] == "20" and ratio["holds"] in ("true", "false")
    assert next(r for r in rows if r["name"] == "data/png_images_per_s@16px")["holds"] == ""
