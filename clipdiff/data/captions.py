"""``cars_text`` label files: object_id → caption, as TSV with a header.

Format (see ``cars_text/README.md``)::

    object_id<TAB>caption[<TAB>more columns…]

``data.captions`` names either a folder holding one file per split (``<split>.tsv``, what
``python -m clipdiff.label`` writes) or one file covering every split (``ground_truth.tsv`` of the procedural
set). Rows are joined by object id, never by line order.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

from clipdiff.data.vocab import parse_caption
from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

REQUIRED = ("object_id", "caption")


def read_caption_file(path: str | Path) -> dict[str, str]:
    """object_id → caption; every caption must parse (see :func:`clipdiff.data.vocab.parse_caption`)."""
    return {oid: cap for oid, (cap, _) in read_caption_table(path).items()}


def read_caption_table(path: str | Path) -> dict[str, tuple[str, str | None]]:
    """object_id → (caption, split or None when the file has no ``split`` column).

    Rows whose ``flag`` column says ``no_images`` (the labeller lists folders without images) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipdiffError(f"caption file {path} does not exist: run `python -m clipdiff.label` or set data.captions")
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM (Excel, Notepad) is not in the header
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ClipdiffError(
                f"{path}: header lacks column(s) {', '.join(missing)} (expected a TSV with 'object_id<TAB>caption')"
            )
        has_split = "split" in (reader.fieldnames or [])
        out: dict[str, tuple[str, str | None]] = {}
        for lineno, row in enumerate(reader, start=2):
            oid, cap = (row["object_id"] or "").strip(), (row["caption"] or "").strip()
            if not oid or not cap:
                raise ClipdiffError(f"{path}:{lineno}: empty object_id or caption")
            if oid in out and out[oid][0] != cap:
                raise ClipdiffError(f"{path}:{lineno}: object {oid} has two captions ({out[oid][0]!r}, {cap!r})")
            try:
                parse_caption(cap)
            except ClipdiffError as e:
                raise ClipdiffError(f"{path}:{lineno}: {e}") from None
            if "no_images" in (row.get("flag") or "").split(","):
                continue  # the labeller's row for a folder without images: nothing to load
            out[oid] = (cap, (row["split"] or "").strip() or None if has_split else None)
    if not out:
        raise ClipdiffError(f"{path}: no rows below the header")
    return out


def caption_file_for(captions: str | Path, split: str) -> Path:
    """The file that holds ``split``'s labels: ``<dir>/<split>.tsv`` for a folder, else the file itself."""
    captions = Path(captions)
    return captions / f"{split}.tsv" if captions.is_dir() or not captions.suffix else captions


def load_split_labels(captions: str | Path, objects_by_split: Mapping[str, Iterable[str]]) -> dict[str, dict[str, str]]:
    """Labels for each split, checked against the objects on disk.

    Every object must have a caption; a per-split file may not name objects missing from its split, and a
    single shared file may not name objects missing from every loaded split (rows whose ``split`` column names
    a split that is not loaded are ignored).
    """
    objects_by_split = {s: list(ids) for s, ids in objects_by_split.items()}
    all_ids = {oid for ids in objects_by_split.values() for oid in ids}
    loaded: dict[Path, dict[str, tuple[str, str | None]]] = {}
    out: dict[str, dict[str, str]] = {}
    for split, ids in objects_by_split.items():
        path = caption_file_for(captions, split)
        if path not in loaded:
            loaded[path] = read_caption_table(path)
        table = loaded[path]
        shared = caption_file_for(captions, split) == caption_file_for(captions, "")
        known = all_ids if shared else set(ids)
        unknown = [oid for oid, (_, sp) in table.items() if oid not in known and (sp is None or sp in objects_by_split)]
        if unknown:
            raise ClipdiffError(
                f"{path}: {len(unknown)} object id(s) not found under data.root "
                f"({'any split' if shared else split}), e.g. {', '.join(unknown[:3])}: is it the label file of another dataset?"
            )
        unlabelled = [oid for oid in ids if oid not in table]
        if unlabelled:
            raise ClipdiffError(
                f"{path}: {len(unlabelled)} object(s) of {split} have no caption, e.g. {', '.join(unlabelled[:3])}; "
                f"label them (python -m clipdiff.label) or remove the folders"
            )
        out[split] = {oid: table[oid][0] for oid in ids}
    return out


def write_caption_file(path: str | Path, rows: list[Mapping[str, object]], columns: list[str]) -> None:
    """Write a label TSV atomically (header first); ``columns`` must start with object_id, caption."""
    if list(columns[:2]) != list(REQUIRED):
        raise ValueError("label files start with the columns object_id, caption")
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
