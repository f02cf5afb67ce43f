"""Label every object folder of one or more splits and write ``<out_dir>/<split>.tsv`` (what ``python -m
clipdiff.label`` runs).

Every object folder gets a row, even one without usable views (fallback caption, confidence 0, flagged), so
downstream code finds every object. An existing label file is never replaced unless asked to, and then the
old one is kept beside it as ``<split>.tsv.bak-<timestamp>``.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from clipdiff.data.captions import read_caption_table, write_caption_file
from clipdiff.data.srn import available_splits, check_root
from clipdiff.data.vocab import parse_caption
from clipdiff.errors import ClipdiffError
from clipdiff.labeling.body import load_body_model
from clipdiff.labeling.labeller import Analysis, Decider, Decision, analyse_object

log = logging.getLogger(__name__)

ALL_SPLITS = ("cars_train", "cars_val", "cars_test")
COLUMNS = ["object_id", "caption", "confidence", "colours", "body_type", "colour_confidence", "type_confidence",
           "free_caption", "mapped_from", "source", "flag", "views"]
GROUND_TRUTH = "ground_truth.tsv"


@dataclass
class Row:
    object_id: str
    split: str
    decision: Decision
    analysis: Analysis
    source: str = "auto"  # auto | fallback | override | clip
    caption: str = ""  # the caption written (an override wins over the decision)
    confidence: float = 0.0

    def as_dict(self, restricted: bool) -> dict[str, str]:
        d = self.decision
        parsed = parse_caption(self.caption)
        return {
            "object_id": self.object_id, "caption": self.caption, "confidence": f"{self.confidence:.3f}",
            "colours": ",".join(parsed.colours), "body_type": parsed.body_type,
            "colour_confidence": f"{d.colour_confidence:.3f}", "type_confidence": f"{d.type_confidence:.3f}",
            "free_caption": d.free_caption,
            "mapped_from": d.free_caption if restricted and d.free_caption != d.caption else "",
            "source": self.source, "flag": ",".join(self.analysis.flags),
            "views": str(self.analysis.views_used),
        }


@dataclass
class LabelResult:
    files: dict[str, Path]  # split → written label file
    backups: dict[str, Path]
    rows: list[Row]
    seconds: float
    agreement: object | None = None  # report.Agreement when ground truth exists
    report_files: list[Path] = field(default_factory=list)
    contact_sheet: Path | None = None

    @property
    def objects_per_second(self) -> float:
        return len(self.rows) / self.seconds if self.seconds > 0 else 0.0


def resolve_splits(root: Path, split: str | Sequence[str]) -> list[str]:
    """``all`` → the standard splits present under ``root``; a name, a comma list or a list → those names."""
    if isinstance(split, str):
        if split.strip() == "all":
            found = [s for s in ALL_SPLITS if (root / s).is_dir()]
            if not found:
                raise ClipdiffError(f"split=all: none of {', '.join(ALL_SPLITS)} is under {root} (found: "
                                    f"{', '.join(available_splits(root)) or 'nothing'}); name the split folder")
            return found
        names = [s.strip() for s in split.split(",") if s.strip()]
    else:
        names = [str(s).strip() for s in split]
    if not names:
        raise ClipdiffError("split is empty: give a split folder (e.g. cars_train), a list, or all")
    for s in names:
        if not (root / s).is_dir():
            raise ClipdiffError(f"split folder {root / s} is missing (found: {', '.join(available_splits(root)) or 'nothing'})")
    return list(dict.fromkeys(names))


def object_dirs(root: Path, split: str) -> list[Path]:
    """Every object folder of a split (also those without images: they get a flagged row)."""
    return sorted(p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith("."))


def read_overrides(path: str | Path) -> dict[str, str]:
    """``object_id<TAB>caption`` lines (an ``object_id``/``caption`` header is optional; # comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ClipdiffError(f"overrides={path} does not exist (expected a TSV: object_id<TAB>caption)")
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, fields in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and fields[0].strip() == "object_id":
                continue
            if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
                raise ClipdiffError(f"{path}:{lineno}: expected 'object_id<TAB>caption', found {'<TAB>'.join(fields)!r}")
            try:
                parse_caption(fields[1].strip())
            except ClipdiffError as e:
                raise ClipdiffError(f"{path}:{lineno}: {e}") from None
            out[fields[0].strip()] = fields[1].strip()
    return out


def check_outputs(files: Iterable[Path], overwrite: bool) -> None:
    existing = [p for p in files if p.exists()]
    if existing and not overwrite:
        raise ClipdiffError(
            f"{', '.join(str(p) for p in existing)} already exist(s); refusing to overwrite labels: pass "
            "overwrite=true (the old file is kept as <split>.tsv.bak-<timestamp>) or choose out_dir=…"
        )


def backup(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        n += 1
    shutil.copy2(path, target)
    return target


def _analyse(task: tuple[str, int | None]) -> Analysis:
    return analyse_object(task[0], task[1])


def analyse_all(dirs: Sequence[Path], views: int | None, workers: int = 2, progress: bool = True,
                desc: str = "label") -> list[Analysis]:
    """Analyse object folders (in ``workers`` processes when that pays), in order."""
    tasks = [(str(d), views) for d in dirs]
    bar = tqdm(total=len(tasks), unit="obj", desc=desc, disable=not progress, dynamic_ncols=True)
    out: list[Analysis] = []
    try:
        if workers <= 1 or len(tasks) < 16:
            for t in tasks:
                out.append(_analyse(t))
                bar.update(1)
        else:
            with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
                for a in pool.imap(_analyse, tasks, chunksize=4):
                    out.append(a)
                    bar.update(1)
    finally:
        bar.close()
    return out


def contact_sheet(rows: Sequence[Row], path: Path, n: int, views: int = 4, cell: int = 64) -> Path | None:
    """A PNG of the ``n`` least confident objects: caption, confidence and flags beside a few of their views."""
    if n <= 0 or not rows:
        return None
    from clipdiff.data.srn import load_image
    from clipdiff.utils.images import labelled_rows, save_png

    worst = sorted(rows, key=lambda r: (r.confidence, r.object_id))[:n]
    sheet = []
    for r in worst:
        imgs = []
        for p in r.analysis.used_paths[:views]:
            try:
                imgs.append(load_image(p, size=cell))
            except ClipdiffError:
                continue
        flags = ",".join(r.analysis.flags)
        label = f"{r.object_id[:8]} {r.caption}  {r.confidence:.2f}" + (f"  [{flags}]" if flags else "")
        sheet.append((label, imgs))
    return save_png(labelled_rows(sheet, cell=cell, label_width=280), path)


def label_dataset(root: str | Path, split: str | Sequence[str] = "all", views: int | None = 8,
                  vocabulary: str = "restricted", overrides: str | Path | None = None,
                  out_dir: str | Path | None = None, overwrite: bool = False, workers: int = 2,
                  progress: bool = True, run_dir: str | Path | None = None, sheet: int = 24,
                  report: bool = True, body_model: str | None = None, clip_ckpt: str | None = None,
                  device: str = "cpu") -> LabelResult:
    """Label the object folders of ``split`` under ``root`` and write one TSV per split (see module doc).

    With ``clip_ckpt`` the captions come from that CLIP export (zero-shot, :mod:`.zeroshot`) instead of the
    image statistics.
    """
    from clipdiff.labeling.report import agreement, write_report

    start = time.perf_counter()
    root = check_root(root)
    if views is not None and int(views) < 1:
        raise ClipdiffError(f"views={views} must be a positive number of views per object (or null for all)")
    splits = resolve_splits(root, split)
    out_dir = Path(out_dir) if out_dir is not None else root / "cars_text"
    files = {s: out_dir / f"{s}.tsv" for s in splits}
    check_outputs(files.values(), overwrite)
    if vocabulary not in ("restricted", "free"):
        raise ClipdiffError(f"vocabulary={vocabulary!r} must be 'restricted' (the 43 original captions) or 'free'")
    decider = None if clip_ckpt else Decider(vocabulary, load_body_model(body_model))
    fixed = read_overrides(overrides) if overrides else {}

    dirs: list[tuple[str, Path]] = []
    for s in splits:
        found = object_dirs(root, s)
        if not found:
            raise ClipdiffError(f"split folder {root / s} holds no object folders")
        dirs += [(s, d) for d in found]
    rows: list[Row] = []
    if clip_ckpt:
        from clipdiff.labeling.zeroshot import clip_decisions

        pairs = clip_decisions([d for _, d in dirs], views, clip_ckpt, device, vocabulary, progress)
        auto_source = "clip"
    else:
        analyses = analyse_all([d for _, d in dirs], views, workers, progress, desc="+".join(splits))
        pairs = [(a, decider.decide(a)) for a in analyses]
        auto_source = "auto"
    for (s, _), (a, d) in zip(dirs, pairs):
        rows.append(Row(a.object_id, s, d, a, auto_source if a.views_used else "fallback", d.caption, d.confidence))
    auto = {r.object_id: r.caption for r in rows}
    if fixed:
        known = {r.object_id for r in rows}
        unknown = [k for k in fixed if k not in known]
        if unknown:
            log.warning("overrides: %d object id(s) are not among the labelled objects, e.g. %s",
                        len(unknown), ", ".join(unknown[:3]))
        for r in rows:
            if r.object_id in fixed:
                r.caption, r.confidence, r.source = fixed[r.object_id], 1.0, "override"

    backups: dict[str, Path] = {}
    restricted = vocabulary == "restricted"
    for s, path in files.items():
        if path.exists():
            backups[s] = backup(path)
            log.info("kept the old %s as %s", path.name, backups[s].name)
        write_caption_file(path, [r.as_dict(restricted) for r in rows if r.split == s], COLUMNS)
    result = LabelResult(files, backups, rows, time.perf_counter() - start)

    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and sheet > 0:
        result.contact_sheet = contact_sheet(rows, run_dir / "least_confident.png", sheet)
    gt_path = root / GROUND_TRUTH
    if report and gt_path.is_file():
        truth = {oid: cap for oid, (cap, _) in read_caption_table(gt_path).items()}
        compared = [(auto[r.object_id], truth[r.object_id]) for r in rows if r.object_id in truth]
        if compared:
            how = f"zero-shot CLIP {clip_ckpt}" if clip_ckpt else "image statistics"
            note = (f"automatic captions (before overrides; {how}) of {len(compared)} objects in {', '.join(splits)}; "
                    f"vocabulary={vocabulary}, views={views}; truth: {gt_path}")
            result.agreement = agreement([p for p, _ in compared], [t for _, t in compared], note)
            if run_dir is not None:
                result.report_files = write_report(result.agreement, run_dir)
    return result
