"""Lightning-free model artefacts (``export.pt``) that the sampler, the evaluator and the labeller load.

An export is a dict saved with ``torch.save``::

    {"format": "clipdiff-export", "version": 1, "kind": "clip" | "noisy_clip" | "ddpm" | "judge" | "realism",
     ...kind-specific entries (config, state_dict, vocabulary, schedule, image_size)...}

``load_export(path, kind)`` turns every way of getting this wrong (missing file, a Lightning checkpoint,
another kind of model, a file that is not a checkpoint) into one ClipdiffError line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipdiff.errors import ClipdiffError
from clipdiff.utils.io import atomic_torch_save

FORMAT = "clipdiff-export"
VERSION = 1
KINDS = ("clip", "noisy_clip", "ddpm", "judge", "realism")


def save_export(path: str | Path, kind: str, **payload: Any) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}")
    path = Path(path)
    atomic_torch_save({"format": FORMAT, "version": VERSION, "kind": kind, **payload}, path)
    return path


def load_export(path: str | Path, kind: str | tuple[str, ...], key: str = "checkpoint") -> dict[str, Any]:
    """Load an export and check its kind; ``key`` names the config key the path came from, for messages."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if path is None:
        raise ClipdiffError(f"{key} is not set: give the export.pt of a trained {' or '.join(kinds)} model")
    path = Path(path)
    if path.is_dir():
        path = path / "export.pt"
    if not path.is_file():
        raise ClipdiffError(f"{key}={path} does not exist: train one with `python -m clipdiff.train model={kinds[0]}`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ClipdiffError(f"{key}={path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = " (a Lightning checkpoint: use the export.pt beside it in the run directory)" if isinstance(obj, dict) and "state_dict" in obj and "pytorch-lightning_version" in obj else ""
        raise ClipdiffError(f"{key}={path} is not a clipdiff export{hint}")
    if obj["kind"] not in kinds:
        raise ClipdiffError(f"{key}={path} holds a {obj['kind']} model, but a {' or '.join(kinds)} model is needed here")
    if obj.get("version", 0) > VERSION:
        raise ClipdiffError(f"{key}={path} was written by a newer clipdiff (export version {obj['version']})")
    return obj
