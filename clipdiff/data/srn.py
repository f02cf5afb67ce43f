"""Reader for the SRN ShapeNet-cars layout, shared by the real data and the procedural set.

::

    ROOT/cars_train/<object_id>/rgb/000000.png …      views of one object (RGB or RGBA on white)
    ROOT/cars_train/<object_id>/pose/000000.txt …     4×4 camera-to-world (16 numbers), optional here
    ROOT/cars_train/<object_id>/intrinsics.txt        optional here
    ROOT/cars_val/…  ROOT/cars_test/…

Object folders are listed in sorted order; nothing depends on directory order. A folder without any
``rgb/*.png`` is skipped with a warning (real downloads sometimes carry stray folders).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipdiff.errors import ClipdiffError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png",)
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}  # mode → white level
_stretch_warned = False


@dataclass
class SrnObject:
    """One object folder and the file names of its (selected) views in ``rgb/``, sorted."""

    object_id: str
    path: Path
    view_names: tuple[str, ...] = ()  # interned: the real set's 537,750 views hold 250 distinct names

    @property
    def views(self) -> list[Path]:
        rgb = self.path / "rgb"
        return [rgb / n for n in self.view_names]


class ViewPaths(Sequence[Path]):
    """The views of a list of objects as one flat sequence of Paths, each made when it is read.

    A list of 537,750 Paths (the real SRN cars) holds ~210 MB of a training process's memory for as long as the data
    lives; this holds the objects' folders, the distinct file names and two int32 per view (~4 MB)."""

    def __init__(self, objects: Sequence[SrnObject]):
        self.dirs = [str(o.path / "rgb") for o in objects]
        counts = [len(o.view_names) for o in objects]
        table: dict[str, int] = {}
        self.names: list[str] = []
        for o in objects:
            for n in o.view_names:
                if n not in table:
                    table[n] = len(self.names)
                    self.names.append(n)
        self.object = np.repeat(np.arange(len(objects), dtype=np.int32), counts)
        self.name = np.fromiter((table[n] for o in objects for n in o.view_names), dtype=np.int32, count=sum(counts))

    def __len__(self) -> int:
        return len(self.name)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Path(self.string(i))

    def string(self, i: int) -> str:
        return os.path.join(self.dirs[self.object[i]], self.names[self.name[i]])

    def strings(self) -> Iterator[str]:
        """Every path as a str, one at a time (no Path objects: what the cache key reads)."""
        dirs, names = self.dirs, self.names
        for o, n in zip(self.object.tolist(), self.name.tolist()):
            yield os.path.join(dirs[o], names[n])


def check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ClipdiffError(
            f"data.root={root} does not exist: render the procedural set with `python -m clipdiff.render "
            f"out_dir={root}` or point data.root at a folder holding cars_train/ (SRN layout)"
        )
    return root


def available_splits(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_names(rgb: str) -> list[str]:
    """The sorted image file names in an ``rgb`` folder ([] when it is missing), interned."""
    try:
        with os.scandir(rgb) as it:
            names = [e.name for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [sys.intern(n) for n in sorted(names)]


def scan_split(root: str | Path, split: str, views_per_object: int | None = None) -> list[SrnObject]:
    """List the objects of one split with their view images (all, or ``views_per_object`` evenly spaced).

    Names, not Paths: listing the real set's 537,750 views this way takes ~1 s and a few MB."""
    root = check_root(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise ClipdiffError(
            f"split folder {split_dir} is missing (found: {', '.join(available_splits(root)) or 'nothing'}); "
            f"check data.root or data.splits"
        )
    objects: list[SrnObject] = []
    empty: list[str] = []
    with os.scandir(split_dir) as it:
        folders = sorted(e.name for e in it if e.is_dir())
    for name in folders:
        obj_dir = split_dir / name
        views = image_names(os.path.join(obj_dir, "rgb"))
        if not views:
            empty.append(name)
            continue
        objects.append(SrnObject(name, obj_dir, tuple(select_views(views, views_per_object))))
    if empty:
        log.warning(
            "%s: skipped %d object folder(s) without rgb/*.png images, e.g. %s",
            split_dir, len(empty), ", ".join(empty[:3]),
        )
    if not objects:
        raise ClipdiffError(f"split folder {split_dir} holds no object folder with rgb/*.png images")
    return objects


def select_views(views: list, k: int | None) -> list:
    """``k`` views spread evenly over the sorted list (all when k is None or too large)."""
    if k is None or k >= len(views):
        return list(views)
    if k < 1:
        raise ClipdiffError(f"data.views_per_object={k} must be a positive number of views, or null for all")
    idx = np.linspace(0, len(views), num=k, endpoint=False).astype(int)
    return [views[i] for i in idx]


def load_image(path: str | Path, size: int | None = None, source_size: list | None = None) -> np.ndarray:
    """Decode one view as uint8 HWC RGB; transparent pixels go onto white; optional square resize.

    16-bit greyscale (Pillow modes ``I;16*`` and ``I``) is scaled to 8 bits (65535 → 255), not clipped (Pillow's
    own ``convert`` clips every value above 255 to white). A non-square image is stretched to the square ``size``,
    and the first one a process meets is named in a warning: SRN renders are square, so one that is not is
    probably a stray file, and training on a stretched car is still better than refusing a whole dataset for it.
    ``source_size``, a list, receives the file's (width, height). Raises ClipdiffError naming the file when it is
    empty or not a readable image.
    """
    global _stretch_warned
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if source_size is not None:
                source_size[:] = im.size
            if im.mode in WIDE_MODES:
                wide = np.asarray(im, dtype=np.float64) * (255.0 / WIDE_MODES[im.mode])
                im = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), "L")
            if size is not None and im.width != im.height and not _stretch_warned:
                _stretch_warned = True
                log.warning("%s is %d×%d, not square: it is stretched to %d×%d (as is any other non-square image; "
                            "crop them square to keep the proportions)", path, im.width, im.height, size, size)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else f"unreadable image ({e})"
        raise ClipdiffError(f"{path}: {reason}; delete or replace it (the packed cache skips such files)") from None


def read_pose(path: str | Path) -> np.ndarray:
    """A 4×4 camera-to-world matrix from an SRN pose file."""
    values = np.loadtxt(path, dtype=np.float64).reshape(-1)
    if values.size != 16:
        raise ClipdiffError(f"{path}: expected 16 numbers (a 4×4 camera-to-world matrix), found {values.size}")
    return values.reshape(4, 4)


def read_intrinsics(path: str | Path) -> dict[str, float]:
    """SRN ``intrinsics.txt``: ``f cx cy 0.`` / ``0. 0. 0.`` / ``1.`` / ``H W``."""
    lines = Path(path).read_text().split("\n")
    try:
        f, cx, cy = (float(v) for v in lines[0].split()[:3])
        h, w = (int(float(v)) for v in lines[3].split()[:2])
    except (IndexError, ValueError):
        raise ClipdiffError(f"{path}: not an SRN intrinsics file ('f cx cy 0.' … 'H W')") from None
    return {"focal": f, "cx": cx, "cy": cy, "height": h, "width": w}
