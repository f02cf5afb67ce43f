"""``python -m clipdiff.bench [--only data overhead sampling growth] [--quick] [--readme]``; ``--gpu`` for the GPU
figures (``benchmarks/gpu.sh``); ``--readme-only`` copies the latest table into README.md without measuring;
``python -m clipdiff.bench scale`` measures the data layer at the real SRN size (:mod:`clipdiff.bench.scale`)."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from clipdiff.bench.common import Claim, load_average
from clipdiff.bench.report import table, update_readme, write
from clipdiff.errors import ClipdiffError

BENCHES = ("data", "overhead", "sampling", "growth")


def run(name: str, a: argparse.Namespace, work: Path) -> list[Claim]:
    q = a.quick
    if name == "data":
        from clipdiff.bench.data import bench_data, render_bench_set

        root = render_bench_set(work / "data", 4 if q else a.objects, 2 if q else a.views)
        return bench_data(root, work / "cache", tuple([16] if q else a.sizes), 0.2 if q else a.budget)
    if name == "overhead":
        from clipdiff.bench.overhead import MODELS, bench_overhead

        models = {m: 4 for m in MODELS} if q else None
        return bench_overhead(models, steps=2 if q else a.overhead_steps, warmup=1 if q else 2,
                              image_size=16 if q else 32)
    if name == "sampling":
        from clipdiff.bench.sampling import bench_sampling

        return bench_sampling(batch=2 if q else a.sample_batch, reps=1 if q else a.reps, recipe_steps=1 if q else 3,
                              image_size=16 if q else 32, steps=2 if q else None, demo=Path(a.demo),
                              clean="clip" if q else "clip_vitb32")
    if name == "growth":
        from clipdiff.bench.growth import bench_growth

        return bench_growth(work / "growth", (2, 3, 4) if q else (20, 40, 80), 2 if q else 12, 16 if q else 128,
                            repeats=1 if q else 5)
    if name == "gpu":
        from clipdiff.bench.gpu import bench_gpu

        if q:
            return bench_gpu(a.gpu_device, "ddpm", 16, batch=2, steps=1, warmup=1, sample_batch=2, sample_steps=2)
        return bench_gpu(a.gpu_device, sample_batch=a.gpu_sample_batch)
    raise ClipdiffError(f"unknown benchmark {name}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clipdiff.bench", description="speed claims as side-by-side ratios")
    ap.add_argument("--only", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--gpu", action="store_true", help="the GPU figures instead (benchmarks/gpu.sh)")
    ap.add_argument("--gpu-device", default="cuda", help="cpu + --quick: the dry run")
    ap.add_argument("--gpu-sample-batch", type=int, default=256, help="gpu: images per guided sampling call")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path in seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded in the output)")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--workdir", default=None, help="where benchmark sets are rendered (default: a temp dir)")
    ap.add_argument("--demo", default="outputs/latest_demo", help="pipeline run whose evaluation gives accuracies")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md")
    ap.add_argument("--readme-only", action="store_true", help="only copy <out>/latest.csv into README.md")
    ap.add_argument("--objects", type=int, default=40, help="data: objects in the rendered benchmark set")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--budget", type=float, default=6.0, help="data: seconds per loader and size")
    ap.add_argument("--overhead-steps", type=int, default=30, help="overhead: alternating step pairs per model")
    ap.add_argument("--sample-batch", type=int, default=16, help="sampling: images per sampling call")
    ap.add_argument("--reps", type=int, default=3, help="sampling: alternating repetitions")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:  # the real-size data layer (its own options: python -m clipdiff.bench scale --help)
        from clipdiff.bench.scale import main as scale_main

        return scale_main(argv[1:])
    args = parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.readme_only:
            print(f"written: {update_readme(out)}")
            return 0
        import torch  # here, not at import: `--help` and `--readme-only` answer at once

        torch.set_num_threads(args.threads)
        load_start = load_average()
        names = ["gpu"] if args.gpu else args.only
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.workdir or tmp)
            claims = [c for name in names for c in run(name, args, work)]
        info = {"command": "python -m clipdiff.bench " + shlex.join(argv),
                "threads": torch.get_num_threads(), "load_start": load_start, "load_end": load_average(),
                "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}"}
        claims += [Claim("bench/torch_threads", info["threads"], None, f"threads ({info['machine']})"),
                   Claim("bench/load_average_start", load_start, None, "1-min load average"),
                   Claim("bench/load_average_end", info["load_end"], None, "1-min load average")]
        path = write(claims, out, info)
        print(table([c.row() for c in claims]))
        print(f"written: {path}")
        if args.readme:
            print(f"written: {update_readme(out)}")
    except ClipdiffError as e:
        print(f"clipdiff: error: {e}", file=sys.stderr)
        return 2
    return 0
