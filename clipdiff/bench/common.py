"""What every benchmark shares: the ``Claim`` row, configs composed as the commands see them, and paired timing."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ["name", "value", "goal", "unit", "holds"]
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@dataclass
class Claim:
    """One row of the table. ``goal=None``: a figure for context; ``value=None``: not measured (``unit`` says why)."""

    name: str
    value: float | None
    goal: float | None
    unit: str
    higher_is_better: bool = True

    @property
    def holds(self) -> bool | None:
        if self.goal is None or self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def row(self) -> dict[str, str]:
        goal = "" if self.goal is None else f"{'>=' if self.higher_is_better else '<='}{self.goal:g}"
        value = "not measured" if self.value is None else f"{self.value:.4g}"
        return {"name": self.name, "value": value, "goal": goal, "unit": self.unit,
                "holds": "" if self.holds is None else str(self.holds).lower()}


def compose(name: str, overrides: Sequence[str] = ()) -> Any:
    """The config ``python -m clipdiff.<name> overrides…`` composes (no Hydra run directory, no ``hydra`` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:…} interpolations resolve
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def interleaved(variants: dict[str, Callable[[], list[float]]], reps: int) -> dict[str, list[list[float]]]:
    """Run each variant once per repetition, alternating the order (ABBA…) so machine-load drift hits all alike.

    A variant returns its per-step (or per-item) times of one repetition; the result keeps them per repetition."""
    names = list(variants)
    out: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(list(variants[n]()))
    return out


def paired_ratio(times: dict[str, list[list[float]]], num: str, den: str) -> float:
    """Median over repetitions of (median time of ``num`` / median time of ``den``) within the same repetition."""
    return statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(times[num], times[den]))


def median_all(runs: list[list[float]]) -> float:
    return statistics.median(t for run in runs for t in run)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``RssAnon``, ``VmRSS``, …); -1 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1
