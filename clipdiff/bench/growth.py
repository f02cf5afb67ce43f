"""Growth: indexing and caching cost vs dataset size (linear), memory flat in dataset size (memmap).

Three procedural sets of n, 2n and 4n objects (same views and image size). At each size:

* **indexing** = ``CarsDataModule.index()`` (SRN folder scan + captions join + vocabulary), median of repeats;
* **caching** = building the packed uint8 memmap of every split (``prepare_data`` into an empty cache dir);
* **memory** = peak growth of a fresh process's anonymous RSS (``RssAnon`` in /proc/self/status: memmap pages are
  file-backed and not counted) over one epoch through the cached train loader
  (batches of 16, so even the smallest set has many batches and one batch is small next to the data).

Linearity figure: cost per object at the largest size / at the smallest (≤ 1.5: no worse than linear; fixed costs
make it < 1). Memory figure: (anon growth at the largest − at the smallest) / (cache bytes at the largest − at the
smallest): ≈ 1 would mean the data is held in memory, ≈ 0 is flat.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from clipdiff.bench.common import Claim, proc_status_kib, timed
from clipdiff.bench.data import render_bench_set

SPLITS = {"train": "cars_train", "val": "cars_val", "test": "cars_test"}


def _dm(root: Path, size: int, cache_dir: Path):
    from clipdiff.data.datamodule import CarsDataModule

    splits = {stage: name for stage, name in SPLITS.items() if (root / name).is_dir()}  # tiny sets lack some
    return CarsDataModule(str(root), captions=str(root / "ground_truth.tsv"), splits=splits, image_size=size,
                          batch_size=16, cache=True, cache_dir=str(cache_dir), progress=False)


def anon_growth_kib(root: Path, size: int, cache_dir: Path) -> int:
    """Peak RssAnon growth (KiB) from before the DataModule exists to the end of one epoch of its cached train
    loader (sampled after every batch), in a fresh interpreter: a heap grown and freed by earlier benchmarks
    would otherwise absorb the data unseen."""
    out = subprocess.run([sys.executable, "-m", "clipdiff.bench.growth", str(root), str(size), str(cache_dir)],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def _child(root: Path, size: int, cache_dir: Path) -> int:
    import clipdiff.data.datamodule  # noqa: F401  (imports are not the data's memory)

    base = peak = proc_status_kib("RssAnon")
    dm = _dm(root, size, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    for batch in dm.train_dataloader():
        del batch
        peak = max(peak, proc_status_kib("RssAnon"))
    return peak - base


def measure(root: Path, size: int, work: Path, repeats: int) -> dict[str, float]:
    index = statistics.median(timed(lambda: _dm(root, size, work).index()) for _ in range(repeats))
    cache_dir = Path(tempfile.mkdtemp(dir=work))
    dm = _dm(root, size, cache_dir)
    dm.index()
    cache = timed(dm.prepare_data)  # every split's memmap, built from the PNGs
    dm.setup("fit")
    bytes_ = sum(f.stat().st_size for f in cache_dir.glob("*.npy"))
    return {"objects": sum(len(i.objects) for i in dm.index().values()), "index": index, "cache": cache,
            "anon": anon_growth_kib(root, size, cache_dir) * 1024, "bytes": bytes_}


def bench_growth(work: Path, objects: tuple[int, ...] = (20, 40, 80), views: int = 12, image_size: int = 128,
                 repeats: int = 5) -> list[Claim]:
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in objects:
        root = render_bench_set(work / f"growth_{n}", n, views, image_size)
        runs.append(measure(root, image_size, work, repeats))
    small, large = runs[0], runs[-1]
    claims = []
    for r in runs:
        n = r["objects"]
        claims += [Claim(f"growth/index_ms_per_object@{n}obj", 1e3 * r["index"] / n, None, "ms"),
                   Claim(f"growth/cache_ms_per_object@{n}obj", 1e3 * r["cache"] / n, None, f"ms ({views} views, {image_size} px)"),
                   Claim(f"growth/iter_anon_mib@{n}obj", r["anon"] / 2**20, None,
                         f"MiB RssAnon growth, cache {r['bytes'] / 2**20:.1f} MiB")]
    per = {k: (large[k] / large["objects"]) / (small[k] / small["objects"]) for k in ("index", "cache")}
    flat = (large["anon"] - small["anon"]) / max(1, large["bytes"] - small["bytes"])
    span = f"{large['objects']} vs {small['objects']} objects"
    return claims + [
        Claim("growth/index_cost_per_object_ratio", per["index"], 1.5, f"x ({span})", higher_is_better=False),
        Claim("growth/cache_cost_per_object_ratio", per["cache"], 1.5, f"x ({span})", higher_is_better=False),
        Claim("growth/iter_anon_vs_data_growth", flat, 0.1, f"anon bytes / cache bytes added ({span})",
              higher_is_better=False),
    ]


if __name__ == "__main__":  # the memory probe's fresh interpreter (see anon_growth_kib)
    import torch

    torch.set_num_threads(1)
    print(_child(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
