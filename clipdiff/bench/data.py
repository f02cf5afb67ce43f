"""Data path: the PNG-folder loader vs the packed cache, images/s at several sizes (goal ≥ 20×).

Both loaders are the CarsDataModule's own train loader (batch 64, no workers), timed alternately in the same
process. Both hand out the same thing, uint8 [B, 3, H, W] batches (the cache stores that layout; the PNG path
decodes, resizes and transposes each file), so the claim compares like with like. The conversion to float runs after
the batch reaches the training device (``on_after_batch_transfer``); on a GPU it costs next to nothing, on a CPU it
is part of the training step. So it is measured too: a second pair of loops runs that hook on every batch on this CPU,
and the ratio with it is reported beside the claim."""

from __future__ import annotations

import time
from pathlib import Path

from clipdiff.bench.common import Claim, interleaved


def render_bench_set(root: Path, num_objects: int, views: int, image_size: int = 128) -> Path:
    """The procedural car set at ``root`` (reused when it is already there)."""
    from clipdiff.data.procedural import render_dataset

    if not (root / "render.json").is_file():
        render_dataset(root, num_objects=num_objects, views_per_object=views, image_size=image_size, seed=1234,
                       num_workers=1, progress=False)
    return root


def datamodule(root: Path, size: int, cached: bool, cache_dir: Path, splits: dict | None = None, prepare: bool = True,
               **kw):
    """The benchmark sets' DataModule (batches of 64, ground-truth captions); ``prepare``: its data read and set up."""
    from clipdiff.data.datamodule import CarsDataModule

    dm = CarsDataModule(str(root), captions=str(root / "ground_truth.tsv"), splits=splits or {"train": "cars_train"},
                        image_size=size, batch_size=64, cache=cached, cache_dir=str(cache_dir), progress=False, **kw)
    if prepare:
        dm.prepare_data()
        dm.setup("fit")
    return dm


def images_per_second(dm, budget_s: float, convert: bool = False) -> float:
    """Iterate ``dm``'s train loader (epoch after epoch) for about ``budget_s`` seconds after one warm-up batch;
    with ``convert``, each batch also goes through ``dm.on_after_batch_transfer`` (uint8 → float32) on this CPU."""
    loader = dm.train_dataloader()
    next(iter(loader))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        for batch in loader:
            if convert:
                batch = dm.on_after_batch_transfer(batch, 0)
            n += batch["image"].shape[0]
            if time.perf_counter() - t0 > budget_s:
                break
    return n / (time.perf_counter() - t0)


def bench_data(root: Path, cache_dir: Path, sizes: tuple[int, ...], budget_s: float, reps: int = 2) -> list[Claim]:
    claims = []
    for size in sizes:
        dms = {"png": datamodule(root, size, False, cache_dir), "cache": datamodule(root, size, True, cache_dir)}
        loops = {f"{k}{'+convert' * conv}": (lambda dm=dm, conv=conv: [images_per_second(dm, budget_s / reps, conv)])
                 for conv in (False, True) for k, dm in dms.items()}
        runs = interleaved(loops, reps)
        rate = {k: sum(r[0] for r in v) / reps for k, v in runs.items()}
        claims += [Claim(f"data/png_images_per_s@{size}px", rate["png"], None, "images/s (uint8 batches)"),
                   Claim(f"data/cache_images_per_s@{size}px", rate["cache"], None, "images/s (uint8 batches)"),
                   Claim(f"data/cache_vs_png@{size}px", rate["cache"] / rate["png"], 20, "x"),
                   Claim(f"data/cache_vs_png_cpu_float@{size}px", rate["cache+convert"] / rate["png+convert"], None,
                         "x, both also converting to float32 on this CPU (what a CPU-only run sees)")]
    return claims
