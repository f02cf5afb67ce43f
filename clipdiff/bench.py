"""``make bench``: speed claims measured as ratios, side by side in one process (``python -m clipdiff.bench``).

Absolute times on a shared 2-core machine mean little; ratios of two ways of doing the same work, measured
back to back, mean more. Prints a table and writes ``outputs/bench/<timestamp>.csv`` and
``outputs/bench/latest.csv`` with the columns ``name, value, goal, unit, holds``.

Implemented so far: the data path (PNG folders vs the packed cache). The framework-overhead and guided-sampling
claims of issue 9 are still to come.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipdiff.utils.io import atomic_open

COLUMNS = ["name", "value", "goal", "unit", "holds"]


@dataclass
class Claim:
    name: str
    value: float
    goal: float | None  # None: a figure reported for context, not a claim
    unit: str
    higher_is_better: bool = True

    @property
    def holds(self) -> bool | None:
        if self.goal is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def row(self) -> dict:
        return {"name": self.name, "value": f"{self.value:.4g}", "unit": self.unit,
                "goal": "" if self.goal is None else f"{self.goal:g}",
                "holds": "" if self.holds is None else str(self.holds).lower()}


def images_per_second(loader, budget_s: float) -> float:
    """Iterate a DataLoader (epoch after epoch) for about ``budget_s`` seconds after one warm-up batch."""
    next(iter(loader))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        for batch in loader:
            n += batch["image"].shape[0]
            if time.perf_counter() - t0 > budget_s:
                break
    return n / (time.perf_counter() - t0)


def bench_data(root: Path, cache_dir: Path, sizes: tuple[int, ...], budget_s: float) -> list[Claim]:
    from clipdiff.data.datamodule import CarsDataModule

    claims = []
    for size in sizes:
        rates = {}
        for cached in (False, True):
            dm = CarsDataModule(str(root), captions=str(root / "ground_truth.tsv"), splits={"train": "cars_train"},
                                image_size=size, batch_size=64,
                                cache=cached, cache_dir=str(cache_dir), progress=False)
            dm.prepare_data()
            dm.setup("fit")
            rates[cached] = images_per_second(dm.train_dataloader(), budget_s)
        claims += [Claim(f"data/png_images_per_s@{size}px", rates[False], None, "images/s"),
                   Claim(f"data/cache_images_per_s@{size}px", rates[True], None, "images/s"),
                   Claim(f"data/cache_vs_png@{size}px", rates[True] / rates[False], 20, "x")]
    return claims


def render_bench_set(root: Path, num_objects: int, views: int) -> Path:
    from clipdiff.data.procedural import render_dataset

    if not (root / "render.json").is_file():
        render_dataset(root, num_objects=num_objects, views_per_object=views, image_size=128, seed=1234, progress=False)
    return root


BENCHES: dict[str, Callable[[argparse.Namespace, Path], list[Claim]]] = {
    "data": lambda a, work: bench_data(render_bench_set(work / "data", a.objects, a.views), work / "cache",
                                       tuple(a.sizes), a.budget),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="speed claims as side-by-side ratios")
    ap.add_argument("--only", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--objects", type=int, default=40, help="objects in the rendered benchmark set")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--budget", type=float, default=5.0, help="seconds per timed loop")
    ap.add_argument("--workdir", default=None, help="where the benchmark set is rendered (default: a temp dir)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        claims = [c for name in args.only for c in BENCHES[name](args, work)]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for path in (out / f"{stamp}.csv", out / "latest.csv"):
        with atomic_open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(c.row() for c in claims)
    width = max(len(c.name) for c in claims)
    print(f"{'name':{width}s}  {'value':>10s}  {'goal':>6s}  unit      holds")
    for c in claims:
        r = c.row()
        print(f"{c.name:{width}s}  {r['value']:>10s}  {r['goal']:>6s}  {c.unit:8s}  {r['holds']}")
    print(f"written: {out / 'latest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
