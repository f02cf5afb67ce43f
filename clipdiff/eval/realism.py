"""Realism measured in the realism net's feature space, and the check that it measures realism.

The realism net (:mod:`clipdiff.models.components.realism`) is trained to tell the camera pose from grey images: no
guide and no caption classifier shares its features. :func:`realism_features` makes it a
:class:`~clipdiff.eval.fid.FeatureSpace` for :func:`~clipdiff.eval.fid.fd_kid` (and for precision/recall).

:func:`sanity_check` is the evidence that FD in this space measures realism: held-out real renders (a split no model
trains on) are distorted at graded strengths (:mod:`clipdiff.eval.distortions`) and compared with another held-out
set; FD must rise monotonically with strength for noise, blur, patch shuffle, the flat-coloured silhouette and the
colour blobs, and the hue shift alone (shape kept, colours changed) must raise it least at full strength
(:func:`check_failures`). :func:`write_check` writes the table as CSV, Markdown and a plot.

``python -m clipdiff.eval.realism --realism-ckpt EXPORT --data-root DIR [--out DIR] [--samples NAME=DIR …]``
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipdiff.errors import ClipdiffError
from clipdiff.eval.distortions import DISTORTIONS, distort
from clipdiff.eval.fid import FeatureSpace, fd_kid, load_png_dir
from clipdiff.utils.io import atomic_open

log = logging.getLogger(__name__)

MONOTONE = ("noise", "blur", "patch_shuffle", "flat_silhouette", "blobs")  # FD must rise with strength
CONTROL = "hue_shift"  # shape kept: must raise FD least
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def realism_features(net: nn.Module, name: str = "realism") -> FeatureSpace:
    """A loaded realism net (``load_realism``) as a feature space: ``net.features`` on RGB images in [0, 1] of any
    size (the net converts to grey and resizes itself), on the net's device; ``name`` says which net in reports."""
    device = next(net.parameters()).device
    return FeatureSpace(net.eval().features, num_features=net.num_features, name=name).to(device)


def _precomputed(space: nn.Module | FeatureSpace, num_features: int) -> FeatureSpace:
    """A 'feature space' that passes features through, so features computed once are compared many times."""
    return FeatureSpace(nn.Identity(), num_features=num_features, name=getattr(space, "name", "custom"))


@torch.no_grad()
def features_of(space: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([space(b).double().cpu() for b in images.split(batch_size)])


def compare(a: torch.Tensor, b: torch.Tensor, space: nn.Module, seed: int, kid_subsets: int) -> dict[str, Any]:
    """FD/KID (``fd_kid``) between two sets of features of ``space``."""
    return fd_kid(a, b, _precomputed(space, a.shape[1]), kid_subsets=kid_subsets, seed=seed)


def sanity_check(space: nn.Module, reference: torch.Tensor, other: torch.Tensor,
                 kinds: Sequence[str] = tuple(DISTORTIONS), strengths: Sequence[float] = STRENGTHS, seed: int = 0,
                 kid_subsets: int = 20, batch_size: int = 256) -> list[dict[str, Any]]:
    """FD/KID of ``reference`` images distorted by each of ``kinds`` at each of ``strengths`` (seeded) against the
    ``other`` images, in ``space`` (images [N, 3, H, W] in [0, 1] → features). One row per (distortion, strength):
    ``distortion, strength, fd, kid, kid_std, n_reference, n_other``. Strength 0 is the real-against-real floor (the
    same for every distortion: computed once)."""
    other_f = features_of(space, other, batch_size)
    floor = None
    rows = []
    for kind in kinds:
        for s in sorted(float(v) for v in strengths):
            if s == 0 and floor is not None:
                result = floor
            else:
                feats = features_of(space, distort(reference, kind, s, seed=seed), batch_size)
                result = compare(feats, other_f, space, seed, kid_subsets)
                if s == 0:
                    floor = result
            rows.append({"distortion": kind, "strength": s, "fd": result["fd"], "kid": result["kid"],
                         "kid_std": result["kid_std"], "n_reference": len(reference), "n_other": len(other)})
            log.info("%s %.2f: FD %.4g", kind, s, result["fd"])
    return rows


def check_failures(rows: Sequence[Mapping[str, Any]], monotone: Sequence[str] = MONOTONE,
                   control: str = CONTROL) -> list[str]:
    """What the sanity check's rows get wrong (empty: it passes): FD not strictly rising with strength for each of
    ``monotone``, and ``control`` not the smallest FD at the largest strength."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by_kind.setdefault(str(r["distortion"]), []).append((float(r["strength"]), float(r["fd"])))
    failures = []
    for kind in monotone:
        curve = sorted(by_kind.get(kind, []))
        if len(curve) < 2:
            failures.append(f"{kind}: fewer than two strengths measured")
            continue
        drops = [f"{a:g}→{b:g}" for (a, fa), (b, fb) in itertools.pairwise(curve) if not fb > fa]
        if drops:
            failures.append(f"{kind}: FD does not rise at strength {', '.join(drops)}")
    if control in by_kind:
        top = max(s for s, _ in by_kind[control])
        at_top = {k: dict(v).get(top) for k, v in by_kind.items()}
        beaten = [k for k, fd in at_top.items() if k != control and fd is not None and not fd > at_top[control]]
        if beaten:
            failures.append(f"{control} at strength {top:g} (FD {at_top[control]:.4g}) is not below {', '.join(beaten)}")
    return failures


def sample_rows(space: nn.Module, reference: torch.Tensor, other: torch.Tensor, samples: Mapping[str, torch.Tensor],
                seed: int = 0, kid_subsets: int = 20, batch_size: int = 256) -> list[dict[str, Any]]:
    """FD/KID of each folder of samples against the ``reference`` real images, each beside the real floor at the same
    count: as many ``other`` real images (drawn with ``seed``) against the same reference. FD is biased upwards at
    small counts, so a sample row is read against the floor row of its count."""
    ref_f = features_of(space, reference, batch_size)
    rows, floors = [], {}
    for name, images in samples.items():
        n = len(images)
        if n not in floors and n <= len(other):
            pick = torch.randperm(len(other), generator=torch.Generator().manual_seed(seed))[:n]
            floors[n] = compare(features_of(space, other[pick], batch_size), ref_f, space, seed, kid_subsets)
            rows.append({"images": f"real (other split, n={n})", "n": n, **_metrics(floors[n])})
        result = compare(features_of(space, images, batch_size), ref_f, space, seed, kid_subsets)
        rows.append({"images": name, "n": n, **_metrics(result)})
    return rows


def _metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return {"fd": result["fd"], "kid": result["kid"], "kid_std": result["kid_std"]}


# -- writing -------------------------------------------------------------------------------------------------------
def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown(rows: Sequence[Mapping[str, Any]], samples: Sequence[Mapping[str, Any]] = (), space: str = "",
             failures: Sequence[str] | None = None) -> str:
    """The check as Markdown: FD per distortion (rows) and strength (columns), the verdict, the sample rows."""
    failures = check_failures(rows) if failures is None else failures
    strengths = sorted({float(r["strength"]) for r in rows})
    fd = {(r["distortion"], float(r["strength"])): float(r["fd"]) for r in rows}
    kinds = list(dict.fromkeys(r["distortion"] for r in rows))
    n = rows[0]
    lines = [(f"FD in the realism space ({space}) of {n['n_reference']} held-out real renders, distorted, against "
              f"{n['n_other']} others; strength 0 is the real-against-real floor."), "",
             "| distortion | " + " | ".join(f"s={s:g}" for s in strengths) + " |",
             "| --- | " + " | ".join("---:" for _ in strengths) + " |"]
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(f"{fd[(k, s)]:.4g}" if (k, s) in fd else "–" for s in strengths) + " |")
    lines += ["", "Check: " + ("passed (FD rises with strength for " + ", ".join(MONOTONE) + f"; {CONTROL} raises it "
                               "least)" if not failures else "FAILED: " + "; ".join(failures))]
    if samples:
        lines += ["", "| images | n | FD | KID |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['images']} | {r['n']} | {r['fd']:.4g} | {r['kid']:.4g} ± {r['kid_std']:.2g} |" for r in samples]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: Path, space: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipdiff.utils.images import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["distortion"] for r in rows):
        curve = sorted((float(r["strength"]), float(r["fd"])) for r in rows if r["distortion"] == kind)
        ax.plot(*zip(*curve), marker="o", label=kind, linestyle="--" if kind == CONTROL else "-")
    ax.set_yscale("symlog", linthresh=max(1e-3, min(float(r["fd"]) for r in rows if r["fd"] > 0)))
    ax.set_xlabel("distortion strength (0 = held-out real renders)")
    ax.set_ylabel("FD to other held-out real renders")
    ax.set_title(f"Realism sanity check ({space})" if space else "Realism sanity check", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def new_out_dir(out: str | Path | None) -> Path:
    """``out``, or ``outputs/realism_check/<time>``; refused when it already holds files (never overwritten)."""
    path = Path(out) if out else Path("outputs") / "realism_check" / f"{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ClipdiffError(f"--out {path} already exists and is not an empty folder: give a new one (results are "
                            "never overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_check(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, samples: Sequence[Mapping[str, Any]] = (),
                space: str = "") -> dict[str, Path]:
    """``realism_check.csv`` / ``.md`` / ``.png`` (and ``realism_samples.csv`` when there are sample rows)."""
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "realism_check.csv", "md": out_dir / "realism_check.md", "png": out_dir / "realism_check.png"}
    _write_csv(rows, paths["csv"])
    with atomic_open(paths["md"], "w") as f:
        f.write(markdown(rows, samples, space))
    plot(rows, paths["png"], space)
    if samples:
        paths["samples"] = out_dir / "realism_samples.csv"
        _write_csv(samples, paths["samples"])
    return paths


# -- command line ----------------------------------------------------------------------------------------------------
def held_out_images(root: str | Path, split: str, image_size: int, captions: str | None = None,
                    limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """Every view (or ``limit`` drawn with ``seed``) of the ``cars_<split>`` folder as float [N, 3, S, S] in [0, 1]."""
    from clipdiff.data.datamodule import CarsDataModule

    root = Path(root)
    if captions is None and (root / "ground_truth.tsv").is_file():
        captions = str(root / "ground_truth.tsv")  # the procedural set's; real data use ROOT/cars_text
    dm = CarsDataModule(str(root), captions=captions, image_size=image_size, cache=False, progress=False,
                        splits={"test": f"cars_{split}"}, eval_views_per_object=None)
    ds = dm._dataset("test")
    idx = torch.arange(len(ds))
    if limit is not None and limit < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return ds.float_images(idx)


def _parse_samples(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ClipdiffError(f"--samples {item!r}: give NAME=FOLDER (a folder of sample PNGs)")
        if not Path(folder).is_dir():
            raise ClipdiffError(f"--samples {item!r}: {folder} is not a folder")
        out[name] = Path(folder)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clipdiff.eval.realism", description=__doc__.split("\n")[0])
    ap.add_argument("--realism-ckpt", required=True, help="the realism net's export.pt (python -m clipdiff.train model=realism)")
    ap.add_argument("--data-root", required=True, help="dataset root (SRN layout)")
    ap.add_argument("--out", default=None, help="a new folder for the results (default outputs/realism_check/<time>)")
    ap.add_argument("--captions", default=None, help="caption file/folder (default: ROOT/ground_truth.tsv or ROOT/cars_text)")
    ap.add_argument("--reference-split", default="test", help="held-out renders that are distorted (cars_<split>)")
    ap.add_argument("--other-split", default="val", help="held-out renders they are compared with (cars_<split>)")
    ap.add_argument("--num-real", type=int, default=2000, help="at most this many images of each split")
    ap.add_argument("--image-size", type=int, default=None, help="size the real images are read and distorted at "
                    "(default: the net's training size, the size of the samples it scores)")
    ap.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    ap.add_argument("--samples", nargs="*", default=[], metavar="NAME=FOLDER",
                    help="folders of samples whose FD against the reference split is reported too")
    ap.add_argument("--kid-subsets", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """The command's work: returns the rows, sample rows, failures and written paths (errors are ClipdiffErrors)."""
    args = parser().parse_args(argv)
    from clipdiff.models.components.realism import load_realism

    net = load_realism(args.realism_ckpt, key="--realism-ckpt")
    samples = {name: load_png_dir(folder) for name, folder in _parse_samples(args.samples).items()}
    out = new_out_dir(args.out)
    size = args.image_size or net.image_size
    space = realism_features(net, name=f"realism:{args.realism_ckpt}")
    reference = held_out_images(args.data_root, args.reference_split, size, args.captions, args.num_real, args.seed)
    other = held_out_images(args.data_root, args.other_split, size, args.captions, args.num_real, args.seed + 1)
    rows = sanity_check(space, reference, other, strengths=args.strengths, seed=args.seed, kid_subsets=args.kid_subsets)
    srows = sample_rows(space, reference, other, samples, args.seed, args.kid_subsets)
    paths = write_check(rows, out, srows, space.name)
    print(paths["md"].read_text(), end="")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "samples": srows, "failures": check_failures(rows), "paths": paths}


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the check passes, 1 when it fails, 2 on a user's error (one line)."""
    try:
        result = run(argv)
    except ClipdiffError as e:
        print(f"clipdiff: error: {e}", file=sys.stderr)
        return 2
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
