"""The judge against its controls: ``python -m clipdiff.eval.judge_controls JUDGE [--data-root DIR] [--captions TSV]
[--split test] [--samples DIR ...] [--out DIR]``.

Rows: the held-out real renders of ``--split`` (every view), the same renders made into controls
(:mod:`clipdiff.eval.controls`: flat silhouettes, colour-matched noise inside the car and over the whole image),
and each ``--samples`` folder (``samples/<method>/<scale>/`` of an evaluation; targets from its caption folders).
Columns: ``n``; ``passed`` (the share the judge does not refuse); ``type_raw`` / ``colour_raw`` / ``caption_raw``
(hits without refusal) and ``type`` / ``colour`` / ``caption`` (judged: a refused image misses every part);
``majority_type`` (the share of the commonest body type among the targets: what always naming it scores) and
``pred_<type>`` (the share of images the type net names each body type, refused or not). Writes
``judge_controls.csv`` and ``judge_controls.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clipdiff.errors import ClipdiffError
from clipdiff.eval import controls
from clipdiff.eval.report import write_csv


def control_row(judge, name: str, images: torch.Tensor, captions: Sequence[str]) -> dict[str, Any]:
    target = torch.tensor([judge.vocabulary.index(c) for c in captions])
    raw = judge.correct(images, target, refuse=False)
    judged = judge.correct(images, target)
    pred = judge.predict(images)["type"]
    types = [judge.type_names[i] for i in judge.type_of[target].tolist()]
    row = {"set": name, "n": len(captions), "passed": 1.0 - judged["refused"].float().mean().item(),
           **{f"{p}_raw": raw[p].float().mean().item() for p in ("caption", "colour", "type")},
           **{p: judged[p].float().mean().item() for p in ("caption", "colour", "type")},
           "majority_type": Counter(types).most_common(1)[0][1] / len(types)}
    for i, t in enumerate(judge.type_names):
        row[f"pred_{t}"] = (pred == i).float().mean().item()
    return row


def real_images(judge, root: str, captions: str | None, split: str, cache_dir: str | None):
    from clipdiff.data.datamodule import CarsDataModule

    dm = CarsDataModule(root, captions=captions, image_size=judge.image_size, eval_views_per_object=None,
                        cache=cache_dir is not None, cache_dir=cache_dir, progress=False)
    ds = dm._dataset(split)
    images = ds.float_images(range(len(ds)))
    return images, [dm.vocab.captions[i] for i in ds.caption_ids.tolist()]


def run(judge_path: str, root: str, captions: str | None, split: str, samples: Sequence[str], cache_dir: str | None,
        seed: int = 0) -> list[dict[str, Any]]:
    from clipdiff.models.components.judge import load_judge

    judge = load_judge(judge_path, key="judge")
    images, names = real_images(judge, root, captions, split, cache_dir)
    gen = torch.Generator().manual_seed(seed)
    rows = [control_row(judge, f"real {split}", images, names),
            control_row(judge, "flat silhouette", controls.flat_silhouette(images), names),
            control_row(judge, "noise inside car", controls.noise_inside(images, gen), names),
            control_row(judge, "noise whole image", controls.noise_image(images, gen), names)]
    for folder in samples:
        sample_images, sample_captions = controls.load_sample_folder(folder, judge.vocabulary)
        rows.append(control_row(judge, "samples " + "/".join(Path(folder).parts[-2:]), sample_images, sample_captions))
    return rows


def in_evaluation(cfg, pipe, judge, jobs, matched: torch.Tensor | None, targets: list[str]) -> list[dict[str, Any]]:
    """The control rows of ``clipdiff.evaluate`` (``controls.csv``; ``images`` keeps each set's images for a grid):
    real renders of the target captions (``matched``, in target order), the same made into controls, and the
    first guided method at ``controls.overguided_scale``, far past any default: blobs a judge must refuse."""
    import dataclasses

    k = min(int(cfg.controls.num), len(targets))
    pick = torch.linspace(0, len(targets) - 1, k).round().long()  # spread over the captions
    names, seed, sets = [targets[i] for i in pick.tolist()], int(cfg.seed), {}
    if matched is not None:
        real, gen = matched[pick], torch.Generator().manual_seed(seed)
        sets |= {"held-out real": real, "flat silhouette": controls.flat_silhouette(real),
                 "noise inside car": controls.noise_inside(real, gen), "noise whole image": controls.noise_image(real, gen)}
    guided = next(((m, job) for m, _, job in jobs if job.guidance is not None), None)
    scale = float(cfg.controls.overguided_scale)
    if guided is not None and scale > 0:
        method, job = guided
        over = pipe.prepare(names, guidance=dataclasses.replace(job.guidance, scale=scale), sampler=job.sampler,
                            seed=seed, batch_size=int(cfg.batch_size), prefix=f"guides.{method}")
        sets[f"over-guided ({method} s={scale:g})"] = pipe.draw(over, score=False).images
    return [{**control_row(judge, name, images, names), "images": images} for name, images in sets.items()]


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" if c == "set" else "---:" for c in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if isinstance(r[c], (str, int)) else f"{r[c]:.3f}" for c in cols)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("judge", help="a judge export.pt or its run directory")
    ap.add_argument("--data-root", default="outputs/data/procedural")
    ap.add_argument("--captions", default=None, help="label file(s) (default: <data-root>/cars_text)")
    ap.add_argument("--split", default="test", help="held-out split of real renders (never trained on)")
    ap.add_argument("--samples", nargs="*", default=[], help="samples/<method>/<scale> folders of an evaluation")
    ap.add_argument("--cache-dir", default=None, help="packed image cache (default: decode the PNGs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write judge_controls.csv and .md here")
    args = ap.parse_args(argv)
    try:
        rows = run(args.judge, args.data_root, args.captions, args.split, args.samples, args.cache_dir, args.seed)
    except ClipdiffError as e:
        print(f"clipdiff: error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    if args.out:
        out = Path(args.out)
        write_csv(rows, list(rows[0]), out / "judge_controls.csv")
        (out / "judge_controls.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
