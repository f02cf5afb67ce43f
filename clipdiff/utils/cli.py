"""Shared plumbing for the Hydra entry points (``python -m clipdiff.<command>``)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from clipdiff.errors import ClipdiffError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

log = logging.getLogger("clipdiff")


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Turn ``fn(cfg)`` into a Hydra command that reports :class:`ClipdiffError` as one line, exit code 2."""

    def wrap(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            try:
                return fn(cfg)
            except ClipdiffError as e:
                print(f"clipdiff: error: {e}", file=sys.stderr, flush=True)
                sys.exit(2)

        return hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)

    return wrap


def run_dir() -> Path:
    """The current Hydra run directory (or the working directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(os.getcwd())
