"""Data path: the PNG-folder loader vs the packed cache, images/s at several sizes (goal ≥ 20×).

Both loaders are the CarsDataModule's own train loader (batch 64, no workers), timed alternately in the same
process; each timed loop includes everything the CPU does to deliver a float batch."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from clipdiff.bench.common import Claim, interleaved, timed


def render_bench_set(root: Path, num_objects: int, views: int, image_size: int = 128) -> Path:
    """The procedural car set at ``root`` (reused when it is already there)."""
    from clipdiff.data.procedural import render_dataset

    if not (root / "render.json").is_file():
        render_dataset(root, num_objects=num_objects, views_per_object=views, image_size=image_size, seed=1234,
                       num_workers=1, progress=False)
    return root


def datamodule(root: Path, size: int, cached: bool, cache_dir: Path, splits: dict | None = None, **kw):
    from clipdiff.data.datamodule import CarsDataModule

    dm = CarsDataModule(str(root), captions=str(root / "ground_truth.tsv"), splits=splits or {"train": "cars_train"},
                        image_size=size, batch_size=64, cache=cached, cache_dir=str(cache_dir), progress=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


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


def conversion_share(ds, batch: int = 64, reps: int = 20) -> float:
    """Share of a cached batch's ``__getitems__`` time that is not the memmap gather (uint8 HWC → float CHW)."""
    import numpy as np

    rng = np.random.default_rng(0)
    picks = [rng.choice(len(ds), min(batch, len(ds)), replace=False).tolist() for _ in range(reps)]
    ds.__getitems__(picks[0])
    total = statistics.median(timed(lambda p=p: ds.__getitems__(p)) for p in picks)
    gather = statistics.median(timed(lambda p=p: ds.packed.images[ds.rows[np.asarray(p)]]) for p in picks)
    return 1 - gather / total


def bench_data(root: Path, cache_dir: Path, sizes: tuple[int, ...], budget_s: float, reps: int = 2) -> list[Claim]:
    claims = []
    for size in sizes:
        cached = datamodule(root, size, True, cache_dir)
        loaders = {"png": datamodule(root, size, False, cache_dir).train_dataloader(),
                   "cache": cached.train_dataloader()}
        rates = interleaved({k: (lambda ld=ld: [images_per_second(ld, budget_s / reps)]) for k, ld in loaders.items()},
                            reps)
        png, cache = (sum(r[0] for r in rates[k]) / reps for k in ("png", "cache"))
        claims += [Claim(f"data/png_images_per_s@{size}px", png, None, "images/s"),
                   Claim(f"data/cache_images_per_s@{size}px", cache, None, "images/s"),
                   Claim(f"data/cache_convert_share@{size}px", conversion_share(cached.datasets["train"]), None,
                         "of a cached batch's build time spent on uint8 HWC -> float CHW (rest: memmap gather)"),
                   Claim(f"data/cache_vs_png@{size}px", cache / png, 20, "x")]
    return claims
