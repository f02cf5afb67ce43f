"""Dataset statistics and a contact sheet (a row per caption class) for a quick look at a dataset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from clipdiff.data.datamodule import CarsImages
from clipdiff.data.srn import load_image
from clipdiff.utils.images import labelled_rows, save_png


def contact_sheet(ds: CarsImages, path: str | Path, per_class: int = 8, cell: int = 96, seed: int = 0) -> Path:
    """Save a PNG with one row per caption (most frequent first), each showing different objects.

    Views are decoded from their PNG files at ``cell`` pixels, not taken from the (small) training cache.
    """
    rng = np.random.default_rng(seed)
    idx = ds.index
    by_caption: dict[str, list[int]] = {}
    for obj, cap in enumerate(idx.captions):
        by_caption.setdefault(cap, []).append(obj)
    counts = Counter(idx.captions)
    first_row_of_object = {}
    for i, row in enumerate(ds.rows):
        first_row_of_object.setdefault(int(idx.object_index[row]), []).append(i)
    rows = []
    for cap, _ in counts.most_common():
        objs = [o for o in by_caption[cap] if o in first_row_of_object]
        chosen = rng.permutation(objs)[:per_class]
        picks = [ds.rows[int(rng.choice(first_row_of_object[int(o)]))] for o in chosen]
        imgs = [load_image(idx.paths[r], cell) for r in picks]
        if imgs:
            rows.append((f"{cap} ({counts[cap]})", np.stack(imgs)))
    return save_png(labelled_rows(rows, cell), path)


def format_statistics(stats: dict) -> str:
    """A short human-readable table of :meth:`CarsDataModule.statistics`."""
    lines = [f"vocabulary: {stats['vocabulary']} captions"]
    for stage in ("train", "val", "test"):
        if stage in stats:
            s = stats[stage]
            top = ", ".join(f"{c} {n}" for c, n in list(s["captions"].items())[:4])
            lines.append(f"{stage:5s} {s['split']:10s} {s['objects']:5d} objects {s['images']:7d} images | {top} …")
    return "\n".join(lines)
