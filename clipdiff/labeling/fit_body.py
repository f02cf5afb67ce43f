"""Refit the body-type model shipped as ``clipdiff/labeling/body_model.json``.

    python -m clipdiff.labeling.fit_body DIR [DIR …] [--views 8] [--out clipdiff/labeling/body_model.json]
    python -m clipdiff.labeling.fit_body --render DIR --per-type 200 --seed 104   # render a balanced set first

Each DIR is a rendered set with a ``ground_truth.tsv`` (object_id, split, caption, colours, body_type). The
labeller itself never reads ground truth; only this fitting step does. Fit on renders whose seeds differ from
the ones you report agreement on. ``--render`` writes a class-balanced set first (every body type equally
often, random one- or two-tone paint over all seven colours, 8 views of 128 px, the procedural renderer's
cameras). The shipped model: ``--render outputs/data/label_fit --per-type 200 --seed 104``.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipdiff.data.vocab import BODY_TYPES
from clipdiff.labeling import body as body_mod
from clipdiff.labeling.labeller import analyse_object


def _spec(seed: int, index: int):
    from clipdiff.data.procedural.generate import ObjectSpec, object_id
    from clipdiff.data.vocab import COLOURS, make_caption

    rng = np.random.default_rng([seed, index, 99])
    body_type = BODY_TYPES[index % len(BODY_TYPES)]
    if rng.uniform() < 0.6:
        colours = (COLOURS[int(rng.integers(len(COLOURS)))],)
    else:
        a, b = rng.choice(len(COLOURS), 2, replace=False)
        colours = (COLOURS[int(a)], COLOURS[int(b)])
    return ObjectSpec(index, object_id(seed, index), "cars_train", make_caption(colours, body_type), colours, body_type)


def _render_one(task: tuple[str, int, int, int]) -> None:
    from PIL import Image

    from clipdiff.data.procedural.generate import format_intrinsics, format_pose, render_object

    out, seed, index, views = task
    spec = _spec(seed, index)
    d = Path(out) / spec.split / spec.object_id
    (d / "rgb").mkdir(parents=True, exist_ok=True)
    (d / "pose").mkdir(parents=True, exist_ok=True)
    for v, (rgb, pose) in enumerate(render_object(spec, seed, views, 128)):
        Image.fromarray(rgb).save(d / "rgb" / f"{v:06d}.png")
        (d / "pose" / f"{v:06d}.txt").write_text(format_pose(pose))
    (d / "intrinsics.txt").write_text(format_intrinsics(128))


def render_balanced(out: Path, per_type: int, seed: int, views: int = 8, workers: int = 2) -> Path:
    """A class-balanced rendered set with ground truth (for fitting only; see the module doc)."""
    from clipdiff.data.procedural.generate import write_ground_truth

    n = per_type * len(BODY_TYPES)
    tasks = [(str(out), seed, i, views) for i in range(n)]
    with mp.get_context("spawn").Pool(workers) as pool:
        list(tqdm(pool.imap_unordered(_render_one, tasks, chunksize=4), total=n, desc="render"))
    write_ground_truth(out / "ground_truth.tsv", [_spec(seed, i) for i in range(n)])
    return out


def _features(task: tuple[str, int]) -> np.ndarray | None:
    path, views = task
    return analyse_object(path, views).features


def collect(dirs: list[Path], views: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    tasks, labels = [], []
    for d in dirs:
        with (d / "ground_truth.tsv").open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                tasks.append((str(d / row["split"] / row["object_id"]), views))
                labels.append(BODY_TYPES.index(row["body_type"]))
    with mp.get_context("spawn").Pool(workers) as pool:
        feats = list(tqdm(pool.imap(_features, tasks, chunksize=8), total=len(tasks), desc="features"))
    keep = [i for i, f in enumerate(feats) if f is not None]
    return np.stack([feats[i] for i in keep]), np.array([labels[i] for i in keep])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path)
    ap.add_argument("--render", type=Path, help="first render a class-balanced set here (then fit on it too)")
    ap.add_argument("--per-type", type=int, default=200)
    ap.add_argument("--seed", type=int, default=104)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name(body_mod.MODEL_FILE))
    args = ap.parse_args(argv)
    if args.render is not None:
        if not (args.render / "ground_truth.tsv").is_file():
            render_balanced(args.render, args.per_type, args.seed, args.views, args.workers)
        args.dirs.append(args.render)
    if not args.dirs:
        ap.error("give rendered DIRs with ground_truth.tsv, or --render DIR")
    x, y = collect(args.dirs, args.views, args.workers)
    model = body_mod.fit_body_model(x, y, list(BODY_TYPES), l2=args.l2, info={
        "fit_on": [str(d) for d in args.dirs], "objects": len(y), "views": args.views,
        "per_class": {t: int((y == i).sum()) for i, t in enumerate(BODY_TYPES)},
        "command": "python -m clipdiff.labeling.fit_body " + " ".join(argv if argv is not None else sys.argv[1:])})
    acc = float((model.log_probs(x).argmax(1) == y).mean())
    model.info["train_accuracy"] = round(acc, 4)
    args.out.write_text(json.dumps(model.to_json(), indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: fit on {len(y)} objects, training accuracy {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
