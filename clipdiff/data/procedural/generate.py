"""Sample object specs and write the procedural car set in the SRN ShapeNet-cars layout.

::

    OUT/cars_train/<object_id>/rgb/000000.png …    RGB, white background, 8-bit
    OUT/cars_train/<object_id>/pose/000000.txt …   4×4 camera-to-world, 16 numbers on one line (OpenCV axes)
    OUT/cars_train/<object_id>/intrinsics.txt      "f cx cy 0." / "0. 0. 0." / "1." / "H W"
    OUT/cars_val/…  OUT/cars_test/…
    OUT/ground_truth.tsv                           object_id, split, caption, colours, body_type
    OUT/render_timing.json                         how long it took (the one file that differs between equal renders)
    OUT/render.json                                the render config; written last: no file, no dataset

Captions are drawn from the 43 captions of the original hand labels (:func:`clipdiff.data.vocab.caption_prior`)
with probability ∝ count^(1/T), T = ``caption_temperature``: T = 1 keeps the original prior (~52% "a white
car"), larger T flattens it towards uniform over the 43 captions, T < 1 sharpens it.

Everything about object i (caption, shape, paint, views) comes from random streams seeded by (seed, i), so
a render is byte-identical for a seed whatever ``num_workers`` is, and the first N objects of a larger render
are the same objects. Splits are a seeded shuffle of the objects cut by the split fractions (largest
remainder rounding). Cameras: azimuth stratified over the circle (one random offset, jittered strata),
elevation uniform in [5°, 60°], radius 1.3, looking at the origin (world +z up; see :mod:`.raster`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipdiff.data.procedural.geometry import build_car
from clipdiff.data.procedural.raster import CAMERA_RADIUS, intrinsics, look_at_pose, render_mesh
from clipdiff.data.vocab import caption_prior, parse_caption
from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

log = logging.getLogger(__name__)

RENDERER_VERSION = 2  # bump whenever the pixels or files for a given config change (reuse compares it)
DEFAULT_SPLITS: dict[str, float] = {"cars_train": 0.8, "cars_val": 0.1, "cars_test": 0.1}
ELEVATION_RANGE = (5.0, 60.0)
MARKER = "render.json"
PARTIAL_MARKER = ".render.partial.json"
TIMING = "render_timing.json"  # how long the render took: the one file that differs between identical renders
GROUND_TRUTH = "ground_truth.tsv"
GROUND_TRUTH_COLUMNS = ("object_id", "split", "caption", "colours", "body_type")

# random stream ids under (seed, object index)
_CAPTION, _SHAPE, _VIEWS = 0, 1, 2
_SPLIT_STREAM = 0x5E11


@dataclass(frozen=True)
class ObjectSpec:
    index: int
    object_id: str
    split: str
    caption: str
    colours: tuple[str, ...]
    body_type: str


@dataclass(frozen=True)
class RenderConfig:
    """Everything that determines the bytes of a render (``num_workers`` and progress bars do not)."""

    num_objects: int = 600
    views_per_object: int = 24
    image_size: int = 128
    seed: int = 0
    splits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    caption_temperature: float = 1.0
    supersample: int = 3
    version: int = RENDERER_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["splits"] = {str(k): float(v) for k, v in self.splits.items()}
        d["caption_temperature"] = float(self.caption_temperature)
        return d


@dataclass
class RenderResult:
    out_dir: Path
    config: dict
    reused: bool
    num_objects: int
    num_images: int  # images written by this call (0 when reused)
    seconds: float
    split_counts: dict[str, int]

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# Sampling


def caption_distribution(temperature: float = 1.0) -> dict[str, float]:
    """Caption → probability ∝ count^(1/temperature) over the original caption prior."""
    if not temperature > 0:
        raise ClipdiffError(
            f"caption_temperature={temperature} must be > 0 (1: original prior; larger: flatter)"
        )
    prior = caption_prior()
    counts = np.array(list(prior.values()), dtype=np.float64)
    logits = np.log(counts) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return dict(zip(prior, p.tolist()))


def object_id(seed: int, index: int) -> str:
    """A 32-hex-digit id (like ShapeNet's), a pure function of (seed, index)."""
    return hashlib.md5(f"clipdiff-procedural-car/{seed}/{index}".encode()).hexdigest()


def check_splits(splits: Mapping[str, float] | None) -> dict[str, float]:
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if not splits:
        raise ClipdiffError(
            "splits is empty: give fractions like {cars_train: 0.8, cars_val: 0.1, cars_test: 0.1}"
        )
    for name, frac in splits.items():
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ClipdiffError(f"splits: {name!r} is not a plain folder name (e.g. cars_train)")
        try:
            ok = float(frac) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ClipdiffError(f"splits.{name}={frac!r} must be a fraction >= 0")
    total = sum(float(v) for v in splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ClipdiffError(f"split fractions sum to {total:g}, not 1: {splits}")
    return {str(k): float(v) for k, v in splits.items()}


def split_counts(num_objects: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Objects per split: floor of the fraction, remainders to the largest fractional parts (ties: order)."""
    exact = {k: num_objects * v for k, v in splits.items()}
    counts = {k: int(np.floor(v)) for k, v in exact.items()}
    order = sorted(splits, key=lambda k: -(exact[k] - counts[k]))
    for k in order[: num_objects - sum(counts.values())]:
        counts[k] += 1
    return counts


def sample_specs(
    num_objects: int,
    seed: int = 0,
    splits: Mapping[str, float] | None = None,
    caption_temperature: float = 1.0,
) -> list[ObjectSpec]:
    """The objects of a render: id, split, caption (and its parse), in index order."""
    splits = check_splits(splits)
    dist = caption_distribution(caption_temperature)
    captions, probs = list(dist), np.array(list(dist.values()))
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_objects)
    split_of = np.empty(num_objects, dtype=object)
    start = 0
    for name, n in split_counts(num_objects, splits).items():
        split_of[order[start : start + n]] = name
        start += n
    specs = []
    for i in range(num_objects):
        caption = captions[int(np.random.default_rng([seed, i, _CAPTION]).choice(len(captions), p=probs))]
        parsed = parse_caption(caption)
        specs.append(
            ObjectSpec(i, object_id(seed, i), str(split_of[i]), caption, parsed.colours, parsed.body_type)
        )
    return specs


def view_angles(seed: int, index: int, views: int) -> np.ndarray:
    """(views, 2) azimuth, elevation in degrees: stratified jittered azimuth, uniform elevation."""
    rng = np.random.default_rng([seed, index, _VIEWS])
    offset = rng.uniform(0.0, 360.0)
    az = (offset + (np.arange(views) + rng.uniform(0.0, 1.0, views)) * 360.0 / views) % 360.0
    el = rng.uniform(*ELEVATION_RANGE, views)
    return np.stack([az, el], 1)


def render_object(
    spec: ObjectSpec, seed: int, views: int, image_size: int, supersample: int = 3
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The views of one object as ``(rgb uint8 [S, S, 3], camera-to-world 4×4)`` pairs, in memory."""
    mesh = build_car(spec.body_type, spec.colours, np.random.default_rng([seed, spec.index, _SHAPE])).pack()
    out = []
    for az, el in view_angles(seed, spec.index, views):
        pose = look_at_pose(az, el, CAMERA_RADIUS)
        rgb, _ = render_mesh(mesh, pose, image_size, supersample)
        out.append((rgb, pose))
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing


def _replace_write(path: Path, data: bytes) -> None:
    """Write through a temporary name and rename: a file either is complete or is not there."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def format_pose(pose: np.ndarray) -> str:
    return " ".join(f"{v:.9f}" for v in np.asarray(pose, dtype=np.float64).reshape(-1)) + "\n"


def format_intrinsics(image_size: int) -> str:
    f, cx, cy = intrinsics(image_size)
    return f"{f:.6f} {cx:.6f} {cy:.6f} 0.\n0. 0. 0.\n1.\n{image_size} {image_size}\n"


def _object_dir(out_dir: Path, spec: ObjectSpec) -> Path:
    return out_dir / spec.split / spec.object_id


def _write_object(task: tuple) -> int:
    """Worker: render and write one object; ``intrinsics.txt`` goes last and marks the object complete."""
    out_dir, spec, cfg = task
    obj = _object_dir(Path(out_dir), spec)
    (obj / "rgb").mkdir(parents=True, exist_ok=True)
    (obj / "pose").mkdir(parents=True, exist_ok=True)
    views = render_object(spec, cfg["seed"], cfg["views_per_object"], cfg["image_size"], cfg["supersample"])
    for v, (rgb, pose) in enumerate(views):
        _replace_write(obj / "rgb" / f"{v:06d}.png", encode_png(rgb))
        _replace_write(obj / "pose" / f"{v:06d}.txt", format_pose(pose).encode())
    _replace_write(obj / "intrinsics.txt", format_intrinsics(cfg["image_size"]).encode())
    return len(views)


def _run(tasks: list[tuple], workers: int) -> Iterator[int]:
    """Render the tasks in this process (workers <= 1) or in ``workers`` spawned processes, in any order."""
    if workers <= 1:
        yield from map(_write_object, tasks)
        return
    # spawn: no fork of a possibly multi-threaded parent (torch, loggers); a worker that cannot start breaks
    # the pool at once (BrokenProcessPool) instead of being restarted forever
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_write_object, t) for t in tasks]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BrokenProcessPool:
            raise ClipdiffError(
                "the render worker processes could not start or died: when calling render_dataset from a "
                "script, guard it with `if __name__ == '__main__':`, or use num_workers=0"
            ) from None
        finally:
            for fut in futures:
                fut.cancel()


def _describe_difference(old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} asked" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "same config"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ClipdiffError(
            f"{path} is not a readable render marker ({e}); delete {path.parent} or pick another out_dir"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ClipdiffError(f"{path} holds no render config; delete {path.parent} or pick another out_dir")
    return data


def read_render_config(out_dir: str | os.PathLike) -> dict | None:
    """The config of a complete render in ``out_dir`` (None when there is no completion marker)."""
    marker = Path(out_dir) / MARKER
    return _read_json(marker)["config"] if marker.is_file() else None


def _prepare(out: Path, config: dict) -> str:
    """Decide what to do with ``out``: 'reuse' (complete, same config), 'resume' or 'fresh'; refuse otherwise."""
    if out.exists() and not out.is_dir():
        raise ClipdiffError(f"out_dir={out} is a file, not a folder; pick another out_dir")
    for name, action, what in ((MARKER, "reuse", "a complete render"), (PARTIAL_MARKER, "resume", "an unfinished render")):
        if (out / name).exists():
            old = _read_json(out / name)["config"]
            if old == config:
                return action
            raise ClipdiffError(
                f"out_dir={out} holds {what} with another config ({_describe_difference(old, config)}); "
                "refusing to overwrite it: pick another out_dir, or delete that folder first"
            )
    if out.is_dir() and any(out.iterdir()):
        raise ClipdiffError(
            f"out_dir={out} exists and is not a procedural render (no {MARKER}); refusing to write into it: "
            "pick another out_dir, or an empty or missing folder"
        )
    return "fresh"


def write_ground_truth(path: Path, specs: Iterable[ObjectSpec]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(GROUND_TRUTH_COLUMNS) + "\n")
        for s in specs:
            f.write(f"{s.object_id}\t{s.split}\t{s.caption}\t{','.join(s.colours)}\t{s.body_type}\n")


def read_ground_truth(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``ground_truth.tsv`` as dicts (columns: object_id, split, caption, colours, body_type)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    if tuple(header) != GROUND_TRUTH_COLUMNS:
        raise ClipdiffError(
            f"{path}: expected columns {', '.join(GROUND_TRUTH_COLUMNS)}, found {', '.join(header)}"
        )
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def render_dataset(
    out_dir: str | os.PathLike,
    num_objects: int = 600,
    views_per_object: int = 24,
    image_size: int = 128,
    seed: int = 0,
    splits: Mapping[str, float] | None = None,
    caption_temperature: float = 1.0,
    num_workers: int = 2,
    supersample: int = 3,
    progress: bool = True,
) -> RenderResult:
    """Render the procedural car set into ``out_dir`` (SRN layout + ground truth + ``render.json``).

    A complete render of the same config is reused as is; an unfinished one of the same config is resumed
    (objects already complete are kept); anything else in ``out_dir`` is refused with a ClipdiffError.
    """
    for key, value, least in (
        ("num_objects", num_objects, 1),
        ("views_per_object", views_per_object, 1),
        ("image_size", image_size, 8),
        ("supersample", supersample, 1),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ClipdiffError(f"{key}={value!r} must be an integer >= {least}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ClipdiffError(f"seed={seed!r} must be an integer >= 0")
    if num_workers is None or int(num_workers) < 0:
        raise ClipdiffError(f"num_workers={num_workers!r} must be >= 0 (0 or 1: render in this process)")
    cfg = RenderConfig(
        int(num_objects),
        int(views_per_object),
        int(image_size),
        int(seed),
        check_splits(splits),
        float(caption_temperature),
        int(supersample),
    )
    config = cfg.to_dict()
    out = Path(out_dir).expanduser()
    start = time.perf_counter()
    specs = sample_specs(cfg.num_objects, cfg.seed, cfg.splits, cfg.caption_temperature)
    per_split = Counter(s.split for s in specs)
    counts = {name: per_split[name] for name in cfg.splits}
    state = _prepare(out, config)
    if state == "reuse":
        return RenderResult(out, config, True, cfg.num_objects, 0, time.perf_counter() - start, counts)

    out.mkdir(parents=True, exist_ok=True)
    if state == "fresh":
        with atomic_open(out / PARTIAL_MARKER, "w") as f:
            json.dump({"config": config}, f, indent=2)
    todo = [s for s in specs if not (_object_dir(out, s) / "intrinsics.txt").is_file()]
    if state == "resume":
        log.info("%s: resuming an unfinished render, %d of %d objects left", out, len(todo), len(specs))
    tasks = [(str(out), s, config) for s in todo]
    workers = min(int(num_workers), len(tasks))
    written = 0
    with tqdm(
        total=len(tasks) * cfg.views_per_object,
        unit="img",
        desc="render",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for n in _run(tasks, workers):
            written += n
            bar.update(n)

    write_ground_truth(out / GROUND_TRUTH, specs)
    summary = {
        "config": config,
        "format": "SRN ShapeNet-cars layout",
        "world_up": "+z",
        "camera": {
            "convention": "OpenCV camera-to-world (x right, y down, z forward)",
            "radius": CAMERA_RADIUS,
            "elevation_deg": list(ELEVATION_RANGE),
        },
        "split_counts": counts,
        "caption_counts": dict(
            sorted(Counter(s.caption for s in specs).items(), key=lambda kv: (-kv[1], kv[0]))
        ),
        "images": cfg.num_objects * cfg.views_per_object,
    }
    # how long it took, beside the marker (whose bytes, like every data file's, depend only on the config): a
    # resumed render counts only its last call's images. `python -m clipdiff.bench scale` reports it on reuse
    with atomic_open(out / TIMING, "w") as f:
        json.dump({"seconds": round(time.perf_counter() - start, 3), "images_written": written, "num_workers": workers,
                   "resumed": state == "resume", "cpus": os.cpu_count()}, f, indent=2)
    with atomic_open(out / MARKER, "w") as f:
        json.dump(summary, f, indent=2)
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    return RenderResult(out, config, False, cfg.num_objects, written, time.perf_counter() - start, counts)
