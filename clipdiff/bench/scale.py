"""``python -m clipdiff.bench scale``: the data layer at the real SRN size, measured (not part of ``make bench`` or the
tests: at 2151 objects × 250 views it renders 537,750 images and caches ~35 GB; about an hour on 2 cores).

Renders (or reuses) a procedural set of the real size in SRN layout, every object in ``cars_train`` as in the real
cars set, and a small set of 9,600 images (the demo's size) to compare memory with. Then, on the large set:

* **render**: seconds and images/s (from the render's ``render_timing.json`` when it is reused);
* **index**: ``CarsDataModule.index()`` (folder scan, label join, vocabulary), median of 3 in this process;
* **cache**: the packed uint8 memmap of the training split at each size: build seconds (from the cache's metadata
  when it was built before) and GiB on disk;
* **first batch**: seconds from creating the DataModule to the first batch of its train loader when the cache
  exists, in a fresh process (the interpreter's imports are reported apart);
* **loader**: images/s of the cached train loader against the PNG loader (batch 64, no workers), alternated;
* **memory**: peak ``RssAnon`` of the training process (``python -m clipdiff.train model=ddpm`` for a few steps, as a
  user runs it, polled from outside). Memory-mapped cache pages are file-backed and not in ``RssAnon``; the goal is
  the large set's peak within 1.2× of the small set's;
* **sampler**: the distinct-caption batch sampler's epoch setup (build + first batch) and a whole epoch of indices.

Everything lands in ``<out>/scale.csv`` (``name, value, goal, unit, holds``), ``scale.json`` and, with ``--readme``,
the README's scale block.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from clipdiff.bench.common import Claim, interleaved, load_average, timed
from clipdiff.bench.data import datamodule
from clipdiff.bench.report import table, update_readme, write
from clipdiff.errors import ClipdiffError

SPLITS = {"cars_train": 1.0}
START, END = "<!-- bench-scale:start -->", "<!-- bench-scale:end -->"


def say(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_set(root: Path, objects: int, views: int, workers: int) -> tuple[float | None, int]:
    """Render (or reuse) ``objects`` × ``views`` at 128 px into ``root``; (seconds, images) of the render that made it
    (None when the marker does not say)."""
    from clipdiff.data.procedural import render_dataset
    from clipdiff.data.procedural.generate import TIMING

    result = render_dataset(root, num_objects=objects, views_per_object=views, image_size=128, seed=0, splits=SPLITS,
                            num_workers=workers)
    if not result.reused:
        return result.seconds, result.num_images
    timing_file = root / TIMING
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    if timing.get("resumed") or not timing.get("seconds"):
        return None, objects * views
    return float(timing["seconds"]), int(timing["images_written"])


def build_caches(root: Path, sizes: list[int], cache_dir: Path) -> list[Claim]:
    from clipdiff.data.cache import PackedImages

    paths = datamodule(root, sizes[0], True, cache_dir, prepare=False).index()["train"].paths
    claims = []
    for size in sizes:
        say(f"packed cache at {size} px ({len(paths):,} images)")
        packed = PackedImages(paths, size, cache_dir, name="cars_train")
        meta = json.loads(packed.meta_file.read_text())
        claims += [Claim(f"cache/build_seconds@{size}px", meta.get("build_seconds"), None,
                         f"s to decode {len(paths):,} PNGs into the memmap"
                         + ("" if meta.get("build_seconds") else " (built before build times were kept)")),
                   Claim(f"cache/size_gib@{size}px", packed.file.stat().st_size / 2**30, None, "GiB on disk")]
    return claims


def first_batch_child(root: Path, size: int, cache_dir: Path) -> None:
    """In a fresh interpreter: seconds to import the DataModule, then from creating it to its first train batch."""
    t0 = time.perf_counter()
    import torch

    from clipdiff.data.datamodule import CarsDataModule  # noqa: F401

    torch.set_num_threads(1)
    imported = time.perf_counter() - t0
    t1 = time.perf_counter()
    dm = datamodule(root, size, True, cache_dir)  # indexed, the cache opened, set up
    next(iter(dm.train_dataloader()))
    print(json.dumps({"import": imported, "first_batch": time.perf_counter() - t1}))


def first_batch(root: Path, size: int, cache_dir: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "clipdiff.bench.scale", "--first-batch-child", str(root), str(size),
                          str(cache_dir)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_peak_anon_mib(root: Path, cache_dir: Path, steps: int, run_dir: Path) -> tuple[float, float]:
    """Peak RssAnon (MiB) of ``python -m clipdiff.train model=ddpm`` on ``root`` for ``steps`` steps, polled every
    50 ms from outside, and its wall seconds."""
    cmd = [sys.executable, "-m", "clipdiff.train", "model=ddpm", f"data.root={root}", f"data.cache_dir={cache_dir}",
           "~data.splits.val", "~data.splits.test", "trainer.limit_val_batches=0", f"trainer.max_steps={steps}",
           "data.batch_size=32", "data.image_size=32", "logger=none", "callbacks=none", "model.sample_every_n_epochs=null",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    status, peak = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            line = next(ln for ln in status.read_text().splitlines() if ln.startswith("RssAnon:"))
            peak = max(peak, int(line.split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise ClipdiffError(f"the training run for the memory figure failed (exit {proc.returncode}): "
                            f"{shlex.join(cmd)}\n{output[-2000:]}")
    return peak / 1024, time.perf_counter() - t0


def warm(file: Path, times: int = 2) -> None:
    """Read ``file`` from start to end ``times`` times, as training epochs bring it into the page cache: twice, since
    the kernel evicts a page read once before one read twice (here: the 128 px cache's pages, read in earlier runs)."""
    for _ in range(times):
        with open(file, "rb") as f, tqdm(total=file.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"reading {file.name}", leave=False) as bar:
            while chunk := f.read(64 << 20):
                bar.update(len(chunk))


def loader_rates(root: Path, size: int, cache_dir: Path, budget: float, label: str = "") -> list[Claim]:
    """Cached against PNG train loader at ``size``. A cache that fits in the page cache is read first (the state of a
    training process after its first epochs); a larger one is read from disk, as training would."""
    from clipdiff.bench.data import images_per_second

    dms = {"png": datamodule(root, size, False, cache_dir), "cache": datamodule(root, size, True, cache_dir)}
    packed = dms["cache"].datasets["train"].packed
    if not packed.from_disk:
        warm(packed.file)
    where = (f"cache {packed.file.stat().st_size / 2**30:.1f} GiB, "
             + ("more than half the RAM: read from disk" if packed.from_disk else "in the page cache"))
    runs = interleaved({k: (lambda dm=dm: [images_per_second(dm, budget / 2)]) for k, dm in dms.items()}, 2)
    rate = {k: statistics.mean(r[0] for r in v) for k, v in runs.items()}
    tag = f"{size}px{label}"
    return [Claim(f"loader/png_images_per_s@{tag}", rate["png"], None, "images/s (uint8 batches of 64)"),
            Claim(f"loader/cache_images_per_s@{tag}", rate["cache"], None, f"images/s (uint8 batches of 64; {where})"),
            Claim(f"loader/cache_vs_png@{tag}", rate["cache"] / rate["png"], 20, "x")]


def sampler_times(root: Path, cache_dir: Path, batch_size: int) -> list[Claim]:
    from clipdiff.data.sampler import DistinctCaptionBatchSampler

    dm = datamodule(root, 32, True, cache_dir)
    captions = dm.datasets["train"].caption_ids
    batch_size = min(batch_size, len(set(captions.tolist())))
    t0 = time.perf_counter()
    sampler = DistinctCaptionBatchSampler(captions, batch_size, seed=0)
    batches = iter(sampler)
    next(batches)
    setup = time.perf_counter() - t0
    n = 1 + sum(1 for _ in batches)
    epoch = time.perf_counter() - t0
    return [Claim("sampler/distinct_caption_epoch_setup_s", setup, None, f"s: build + first batch of {batch_size}"),
            Claim("sampler/distinct_caption_epoch_s", epoch, None, f"s: all {n:,} batches of one epoch (indices only)")]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clipdiff.bench scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=2151)
    ap.add_argument("--views", type=int, default=250)
    ap.add_argument("--small-objects", type=int, default=600, help="the memory comparison's set (600 × 16 = 9,600)")
    ap.add_argument("--small-views", type=int, default=16)
    ap.add_argument("--root", default=None, help="the large set (default outputs/data/scale_<objects>x<views>; the small "
                    "one goes beside it)")
    ap.add_argument("--cache-dir", default="outputs/cache", help="where training commands look for caches")
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="render processes")
    ap.add_argument("--budget", type=float, default=16.0, help="seconds per loader, split over 2 alternated runs")
    ap.add_argument("--train-steps", type=int, default=40, help="steps of each memory-measuring training run")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md (scale block)")
    ap.add_argument("--first-batch-child", nargs=3, help=argparse.SUPPRESS)
    return ap


def measure(a: argparse.Namespace) -> list[Claim]:
    big = Path(a.root or f"outputs/data/scale_{a.objects}x{a.views}")
    small = big.parent / f"scale_{a.small_objects}x{a.small_views}"
    cache_dir = Path(a.cache_dir)
    claims: list[Claim] = []
    for root, objects, views in ((big, a.objects, a.views), (small, a.small_objects, a.small_views)):
        say(f"render {objects} objects × {views} views at 128 px → {root}")
        seconds, images = render_set(root, objects, views, a.workers)
        if root == big:
            claims += [Claim("render/images", images, None, f"images at 128 px ({objects} objects × {views} views)"),
                       Claim("render/seconds", seconds, None, f"s with {a.workers} processes"),
                       Claim("render/images_per_s", None if seconds is None else images / seconds, None, "images/s")]
    n_big = a.objects * a.views
    say("index")
    import clipdiff.data.datamodule  # noqa: F401  (its imports are not indexing)

    index = statistics.median(timed(lambda: datamodule(big, 32, True, cache_dir, prepare=False).index())
                              for _ in range(3))
    claims.append(Claim("index/seconds", index, None, f"s: folder scan + label join of {n_big:,} images (median of 3)"))
    claims += build_caches(big, a.sizes, cache_dir)
    say("first batch from the existing cache (fresh process)")
    fb = first_batch(big, max(a.sizes), cache_dir)
    claims += [Claim(f"first_batch/seconds@{max(a.sizes)}px", fb["first_batch"], 10,
                     "s from creating the DataModule to the first train batch, cache on disk", higher_is_better=False),
               Claim("first_batch/import_seconds", fb["import"], None, "s importing torch + the DataModule before it")]
    for size in sorted(a.sizes, reverse=True):
        say(f"loader: cache vs PNG at {size} px")
        claims += loader_rates(big, size, cache_dir, a.budget)
    say("loader: cache vs PNG at 128 px on the small set, whose cache fits in RAM")
    claims += loader_rates(small, 128, cache_dir, a.budget, label=f"_{a.small_objects * a.small_views}img")
    say("distinct-caption sampler")
    claims += sampler_times(big, cache_dir, 32)
    peaks = {}
    for root, n in ((small, a.small_objects * a.small_views), (big, n_big)):
        datamodule(root, 32, True, cache_dir)  # its 32 px cache, so the run only reads it
        say(f"memory: {a.train_steps} DDPM training steps on {n:,} images")
        with tempfile.TemporaryDirectory(prefix="scale-train-") as run_dir:  # the training run's outputs: not kept
            peaks[n], secs = train_peak_anon_mib(root, cache_dir, a.train_steps, Path(run_dir))
        claims.append(Claim(f"memory/train_peak_rss_anon_mib@{n}img", peaks[n], None,
                            f"MiB, python -m clipdiff.train model=ddpm, {a.train_steps} steps ({secs:.0f} s)"))
    ratio = peaks[n_big] / peaks[a.small_objects * a.small_views]
    claims.append(Claim("memory/train_peak_ratio", ratio, 1.2, f"x ({n_big:,} vs {a.small_objects * a.small_views:,} "
                                                              "images; memory-mapped pages excluded)",
                        higher_is_better=False))
    return claims


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.first_batch_child:
        root, size, cache_dir = a.first_batch_child
        first_batch_child(Path(root), int(size), Path(cache_dir))
        return 0
    import torch

    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start, t0 = load_average(), time.perf_counter()
    try:
        claims = measure(a)
    except ClipdiffError as e:
        print(f"clipdiff: error: {e}", file=sys.stderr)
        return 2
    info = {"command": "python -m clipdiff.bench scale " + shlex.join(argv), "threads": torch.get_num_threads(),
            "load_start": load_start, "load_end": load_average(), "minutes": round((time.perf_counter() - t0) / 60, 1),
            "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, torch {torch.__version__}",
            "note": "Measured once on this machine; rows without a goal are context."}
    path = write(claims, out, info, stem="scale")
    print(table([c.row() for c in claims]))
    print(f"written: {path}")
    if a.readme:
        print(f"written: {update_readme(out, stem='scale', markers=(START, END))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
