"""``clipdiff.eval.front``: each guided method's default is its most accurate scale whose realism stays within the
tolerance of unguided; the Pareto front; the plots exist."""

from __future__ import annotations

import math

from clipdiff.eval.front import mark_defaults, on_front, plot_eps_change, plot_front


def row(method: str, scale: float, acc: float, c2st: float, fd: float = 1.0) -> dict:
    return {"method": method, "scale": scale, "acc_caption": acc, "c2st_grey": c2st, "fd_indep": fd}


def table() -> list[dict]:
    return [row("none", 0.0, 0.10, 0.70),
            row("clip", 3.0, 0.30, 0.71), row("clip", 10.0, 0.50, 0.74), row("clip", 30.0, 0.80, 0.90),  # 30: too far
            row("noisy", 3.0, 0.40, 0.80), row("noisy", 10.0, 0.60, 0.95),  # nothing within 0.05
            row("flat", 3.0, 0.40, 0.72), row("flat", 10.0, 0.40, 0.73)]  # a tie: the smaller scale


def test_default_is_the_most_accurate_scale_within_the_tolerance():
    summary = table()
    chosen = mark_defaults(summary, "c2st_grey", 0.05)
    assert chosen == {"clip": 10.0, "noisy": None, "flat": 3.0}
    assert [(r["method"], r["scale"]) for r in summary if r["is_default"]] == [("clip", 10.0), ("flat", 3.0)]
    assert not summary[0]["is_default"]  # the unguided row is never a default
    # a wider tolerance admits clip s30, the more accurate one
    assert mark_defaults(table(), "c2st_grey", 0.25)["clip"] == 30.0


def test_no_unguided_row_or_measure_means_no_default():
    summary = [r for r in table() if r["method"] != "none"]
    assert set(mark_defaults(summary).values()) == {None}
    nan = table()
    nan[0]["c2st_grey"] = math.nan
    assert set(mark_defaults(nan).values()) == {None} and not any(r["is_default"] for r in nan)


def test_pareto_front():
    rows = [row("a", 1, 0.5, 0.6), row("a", 2, 0.7, 0.7), row("a", 3, 0.6, 0.8),  # s3: beaten by s2
            row("b", 1, 0.5, 0.6), row("none", 0, 0.1, 0.55), row("c", 1, math.nan, 0.5)]
    assert on_front(rows, "c2st_grey") == [True, True, False, True, True, False]


def test_plots_are_written(tmp_path):
    summary = table()
    mark_defaults(summary)
    assert plot_front(summary, tmp_path / "front.png").stat().st_size > 1000
    assert plot_front([row("none", 0, 0.1, math.nan, math.nan)], tmp_path / "x.png", measures=("c2st_grey",)) is None
    steps = [{"method": "clip", "scale": 10.0, "step": i, "eps_shift_rms": 0.1 * (i + 1)} for i in range(5)]
    assert plot_eps_change(steps, tmp_path / "eps.png").stat().st_size > 1000
    assert plot_eps_change([], tmp_path / "none.png") is None
