"""Camera poses of SRN views, as training targets that need shape and not captions.

Every view ``<object>/rgb/000007.png`` has ``<object>/pose/000007.txt``: a 4×4 camera-to-world matrix (16 numbers).
The target a batch carries (``pose``, float32 [B, 3]) is the **unit camera direction**: the camera's position (the
matrix's translation column) divided by its length, in world coordinates — where the camera sits as seen from the
object's centre. It needs no up-axis or camera-axis convention (any fixed rotation of the world only rotates the
targets); :func:`azimuth_elevation` reads azimuth and elevation off it for a given world up axis.

Poses are read once, when a dataset is built, and cached as one ``float32 [N, 4, 4]`` array per split next to the
packed image cache (keyed by the path, size and modification time of every pose file, like the images), so a large
set (the real ShapeNet cars have 537,750 views) opens its text files once, not every epoch or every run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clipdiff.data.cache import cache_key
from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_open

log = logging.getLogger(__name__)

UP_AXES = ("x", "y", "z")


def pose_path(image_path: str | Path) -> Path:
    """``<object>/rgb/000007.png`` → ``<object>/pose/000007.txt``."""
    image_path = Path(image_path)
    return image_path.parent.parent / "pose" / f"{image_path.stem}.txt"


def read_matrix(path: str | Path) -> np.ndarray:
    """The 4×4 camera-to-world matrix of one pose file (float64), checked: 16 finite numbers, a camera away from
    the origin. Anything else is one ClipdiffError naming the file."""
    path = Path(path)
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
    except FileNotFoundError:
        raise ClipdiffError(f"{path}: pose file missing (every rgb/<view>.png needs pose/<view>.txt for camera "
                            "poses); restore it or remove the view") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ClipdiffError(f"{path}: not a pose file ({type(e).__name__}); it should hold the 16 numbers of a 4×4 "
                            "camera-to-world matrix") from None
    if values.size != 16 or not np.isfinite(values).all():
        raise ClipdiffError(f"{path}: expected 16 finite numbers (a 4×4 camera-to-world matrix), found "
                            f"{values.size} numbers{'' if np.isfinite(values).all() else ' with NaN/inf'}")
    matrix = values.reshape(4, 4)
    if np.linalg.norm(matrix[:3, 3]) < 1e-6:
        raise ClipdiffError(f"{path}: the camera sits at the origin (translation 0), so it has no direction; "
                            "SRN cameras sit on a sphere around the object")
    return matrix


def camera_directions(matrices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Unit camera directions (float32 [N, 3]) of camera-to-world matrices [N, 4, 4]: translation / its length."""
    t = torch.as_tensor(np.asarray(matrices), dtype=torch.float64)[..., :3, 3]
    return (t / t.norm(dim=-1, keepdim=True)).float()


def azimuth_elevation(direction: torch.Tensor, up: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """Azimuth (degrees in (-180, 180], counter-clockwise about ``up`` from the next axis in x→y→z order) and
    elevation (degrees above the horizontal plane) of directions [..., 3]; need not be unit length.

    With ``up="z"`` (the procedural set's world): azimuth = atan2(y, x), elevation = asin(z / |d|)."""
    if up not in UP_AXES:
        raise ClipdiffError(f"up={up!r}: choose one of {', '.join(UP_AXES)} (the world's up axis)")
    k = UP_AXES.index(up)
    a, b, c = direction[..., (k + 1) % 3], direction[..., (k + 2) % 3], direction[..., k]
    azimuth = torch.rad2deg(torch.atan2(b, a))
    elevation = torch.rad2deg(torch.atan2(c, torch.sqrt(a * a + b * b)))
    return azimuth, elevation


def read_matrices(image_paths: Sequence[Path]) -> np.ndarray:
    """Pose matrices (float32 [N, 4, 4]) of the views ``image_paths``, read from their pose files (a progress bar
    from 10,000 files on: the real set's 537,750 take minutes)."""
    out = np.empty((len(image_paths), 4, 4), dtype=np.float32)
    bar = tqdm(image_paths, desc="reading camera poses", unit="file", disable=len(image_paths) < 10_000, leave=False)
    for i, p in enumerate(bar):
        out[i] = read_matrix(pose_path(p))
    return out


def load_matrices(image_paths: Sequence[Path], cache_dir: str | Path | None, name: str) -> np.ndarray:
    """Pose matrices (float32 [N, 4, 4]) of the views ``image_paths``, from the cache when one is given and up to date
    (built on first use, written atomically), else read from the pose files."""
    if cache_dir is None:
        return read_matrices(image_paths)
    try:
        key = cache_key((pose_path(p) for p in image_paths), 0)
    except FileNotFoundError as e:
        raise ClipdiffError(f"{e.filename}: pose file missing (every rgb/<view>.png needs pose/<view>.txt for camera "
                            "poses); restore it or remove the view") from None
    file = Path(cache_dir) / f"{name}-poses-{key}.npy"
    if file.exists():
        arr = np.load(file)
        if arr.shape == (len(image_paths), 4, 4):
            return arr
        log.warning("%s has shape %s, not (%d, 4, 4): rebuilding it", file, arr.shape, len(image_paths))
    arr = read_matrices(image_paths)
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(file, "wb") as f:
        np.save(f, arr)
    log.info("cached %d camera poses in %s", len(arr), file)
    return arr

