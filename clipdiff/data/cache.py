"""Packed image cache: every view decoded once into a uint8 memory-mapped array per split and size.

The array is stored channels-first (``[N, 3, H, W]``), the layout a batch has, so serving a batch is one read per
image straight into the batch (:meth:`PackedImages.gather`) and nothing else: the conversion to float happens after
the batch reaches the training device (:meth:`~clipdiff.data.datamodule.CarsDataModule.on_after_batch_transfer`).

A cache file is keyed by the image size and by the path, size and modification time of every input PNG, so it
is rebuilt exactly when its inputs change. It is written to a temporary file and renamed into place, so an
interrupted build leaves nothing half-written. Unreadable or empty PNGs are skipped: their slot stays white,
they are marked invalid in the cache's metadata, listed once in a warning, and left out of the dataset. Non-square
images are stretched to the square size and named in a warning whenever the cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clipdiff.data.srn import ViewPaths, load_image
from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: channels-first; 3: 16-bit greyscale scaled, not clipped


def cache_key(paths: Iterable[str | Path], size: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}".encode())
    for p in paths.strings() if isinstance(paths, ViewPaths) else paths:
        st = os.stat(p)
        h.update(f"|{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def physical_memory() -> float:
    """Bytes of RAM (inf where the system does not say)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


class PackedImages:
    """``images[i]`` is the uint8 CHW array of ``paths[i]`` at ``size``×``size``; ``valid[i]`` says it decoded."""

    def __init__(self, paths: Sequence[Path], size: int, cache_dir: str | Path, name: str, progress: bool = True):
        self.paths = paths if isinstance(paths, ViewPaths) else [Path(p) for p in paths]
        self.size = size
        key = cache_key(self.paths, size)
        cache_dir = Path(cache_dir)
        self.file = cache_dir / f"{name}-{size}px-{key}.npy"
        self.meta_file = self.file.with_suffix(".json")
        if not (self.file.exists() and self.meta_file.exists()):
            self._build(progress)
        self.images = np.load(self.file, mmap_mode="r")
        meta = json.loads(self.meta_file.read_text())
        stretched = meta.get("stretched_paths") or []
        if stretched:  # said on every run that reads this cache, not only the one that built it
            log.warning("%d image(s) are not square and were stretched to %d×%d, e.g. %s (listed in %s)",
                        len(stretched), size, size, stretched[0], self.meta_file)
        self.valid = np.ones(len(self.paths), dtype=bool)
        self.valid[meta["invalid"]] = False
        # a cache that cannot stay in the page cache: gather() asks for a batch's rows at once
        self.from_disk = hasattr(os, "posix_fadvise") and self.file.stat().st_size > physical_memory() / 2
        if self.images.shape != (len(self.paths), 3, size, size):
            raise ClipdiffError(f"{self.file}: cache has shape {self.images.shape}; delete it to rebuild")

    def __len__(self) -> int:
        return len(self.paths)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows`` as uint8 ``[len(rows), 3, S, S]``: one ``preadv`` per image straight into the batch.

        Indexing the memmap instead faults its pages in one at a time: on the real set's size at 128 px (24.6 GB,
        more than the 23 GB of RAM it was measured on) that served ~400 images/s against ~5,000 by preadv. A cache
        larger than half the RAM is mostly read from disk, so every row of the batch is first asked for at once
        (``POSIX_FADV_WILLNEED``: the disk reads them in parallel), ~1.7× again; a cache in the page cache skips
        that (it costs ~20% there). Threads were slower: their GIL hand-offs cost more than the reads."""
        rows = np.asarray(rows, dtype=np.int64)
        if not hasattr(os, "preadv"):
            return self.images[rows]
        out = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        if not len(rows):
            return out
        if getattr(self, "_fd_pid", None) != os.getpid():  # a DataLoader worker is another process: its own file
            self._fd, self._fd_pid = os.open(self.file, os.O_RDONLY), os.getpid()
        size = out[0].nbytes
        starts = (self.images.offset + rows * size).tolist()
        if self.from_disk:
            for start in starts:
                os.posix_fadvise(self._fd, start, size, os.POSIX_FADV_WILLNEED)
        for k, start in enumerate(starts):
            if os.preadv(self._fd, [out[k]], start) != size:
                raise ClipdiffError(f"{self.file}: shorter than its header says; delete it to rebuild")
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_fd_pid")}

    def __del__(self) -> None:
        if getattr(self, "_fd_pid", None) == os.getpid():
            os.close(self._fd)

    def _build(self, progress: bool) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        n, s = len(self.paths), self.size
        started = time.perf_counter()
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, s, s))
        invalid: list[int] = []
        stretched: list[int] = []

        def decode(i: int) -> tuple[int, np.ndarray | None]:
            source: list[int] = []
            try:
                img = load_image(self.paths[i], s, source_size=source)
            except ClipdiffError:
                return i, None
            if source[0] != source[1]:
                stretched.append(i)
            return i, img

        try:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                it = pool.map(decode, range(n), chunksize=64)
                for i, img in tqdm(it, total=n, desc=f"caching {self.file.stem}", disable=not progress, leave=False):
                    if img is None:
                        invalid.append(i)
                        arr[i] = 255
                    else:
                        arr[i] = img.transpose(2, 0, 1)
            arr.flush()
            del arr
            os.replace(tmp, self.file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if invalid:
            log.warning(
                "skipped %d unreadable or empty image(s), e.g. %s (listed in %s)",
                len(invalid), ", ".join(str(self.paths[i]) for i in invalid[:3]), self.meta_file,
            )
        with atomic_open(self.meta_file, "w") as f:
            json.dump({"size": s, "count": n, "build_seconds": round(time.perf_counter() - started, 2), "invalid": invalid,
                       "invalid_paths": [str(self.paths[i]) for i in invalid],
                       "stretched_paths": [str(self.paths[i]) for i in sorted(stretched)]}, f)
