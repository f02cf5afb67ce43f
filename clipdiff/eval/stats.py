"""Statistics that hold for small evaluation counts: intervals for proportions, for proportions measured on many
views of few objects, for paired differences against unguided sampling, and spread over training seeds.

* :func:`wilson` — Wilson score interval (Wilson, 1927): never [1, 1] from 16 hits of 16, good coverage at small n.
* :func:`jeffreys` — equal-tailed Jeffreys interval, Beta(k + ½, n − k + ½) quantiles, with the usual boundary rule
  of Brown, Cai & DasGupta (2001): lower bound 0 when k = 0, upper bound 1 when k = n.
* :func:`clustered_proportion` — a proportion over views grouped by object: the Wilson interval at the effective
  sample size n / deff, where the design effect deff (Kish, 1965) compares the variance of the ratio estimator
  over objects with the binomial variance over views. Views of one object that always agree count as one trial.
* :func:`paired_difference` — difference of two hit rates on paired samples (sample i of method A and of the
  unguided run share the initial noise): Newcombe's (1998, method 10) hybrid score interval for paired proportions.
* :func:`seed_spread` — mean, sample standard deviation, min, max and a Student-t interval over training seeds.

Everything is plain float arithmetic (scipy for quantiles); inputs that cannot give an interval raise a one-line
:class:`~clipdiff.errors.ClipdiffError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from clipdiff.errors import ClipdiffError


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ClipdiffError(f"confidence level must lie in (0, 1), got {level}")
    return float(sps.norm.ppf(0.5 + level / 2.0))


def _check_counts(k: float, n: float) -> None:
    if not (math.isfinite(k) and math.isfinite(n)) or n <= 0 or not 0 <= k <= n:
        raise ClipdiffError(f"a proportion needs 0 <= hits <= trials and trials > 0, got {k} of {n}")


def wilson(k: float, n: float, level: float = 0.95) -> tuple[float, float, float]:
    """Wilson score interval for ``k`` hits in ``n`` trials: ``(p, lo, hi)`` with p = k / n.

    Non-integer k and n are accepted (an effective sample size, see :func:`clustered_proportion`).
    """
    _check_counts(k, n)
    z = _z(level)
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    # at p = 0 or 1 the bound equals p analytically; keep it exact rather than 1e-17 off
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return p, lo, hi


def jeffreys(k: float, n: float, level: float = 0.95) -> tuple[float, float, float]:
    """Equal-tailed Jeffreys interval for ``k`` hits in ``n`` trials: ``(p, lo, hi)``.

    The quantiles of Beta(k + ½, n − k + ½); lo = 0 at k = 0 and hi = 1 at k = n (Brown, Cai & DasGupta, 2001).
    """
    _check_counts(k, n)
    _z(level)
    tail = (1.0 - level) / 2.0
    lo = 0.0 if k == 0 else float(sps.beta.ppf(tail, k + 0.5, n - k + 0.5))
    hi = 1.0 if k == n else float(sps.beta.ppf(1.0 - tail, k + 0.5, n - k + 0.5))
    return k / n, lo, hi


def _binary(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ClipdiffError(f"{name} must be a non-empty 1-D sequence of hits (0/1 or bool), got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ClipdiffError(f"{name} must hold only 0/1 or True/False hits")
    return arr.astype(np.float64)


def clustered_proportion(hits: Sequence[bool] | np.ndarray, clusters: Sequence | np.ndarray,
                         level: float = 0.95) -> dict[str, float]:
    """A proportion over views with an interval over objects (``clusters[i]`` names the object of view i).

    p is the share of hits over all views. Its variance over objects is the ratio-estimator (linearisation)
    variance ``sum_c (y_c - p m_c)^2 / M^2`` (y_c hits and m_c views of object c, M views in all); the design
    effect deff is that variance over the binomial one ``p (1 - p) / M``, clipped below at 1 (views never count
    for more than independent trials), and the interval is :func:`wilson` at the effective sample size
    ``M / deff``. One view per object gives plain Wilson; objects whose views all agree give Wilson over objects.
    When every view is a hit (or none is) the variance says nothing about the clustering, and the worst case is
    taken: one trial per object. Chosen over a cluster bootstrap because it is deterministic and, unlike a
    bootstrap of 16 hits of 16, never gives the interval [1, 1].

    Returns p, lo, hi, n_views, n_objects, n_eff and deff.
    """
    y = _binary(hits, "hits")
    ids = np.asarray(clusters)
    if ids.shape != y.shape:
        raise ClipdiffError(f"hits and clusters must have the same length, got {y.shape[0]} and {ids.shape}")
    _, inverse = np.unique(ids, return_inverse=True)
    c = int(inverse.max()) + 1
    if c < 2:
        raise ClipdiffError("an interval over objects needs views of at least 2 objects")
    m_total = float(y.size)
    p = float(y.mean())
    if p in (0.0, 1.0):
        n_eff, deff = float(c), m_total / c
    else:
        y_c = np.bincount(inverse, weights=y, minlength=c)
        m_c = np.bincount(inverse, minlength=c).astype(np.float64)
        var_cluster = float(((y_c - p * m_c) ** 2).sum()) / m_total**2
        var_binom = p * (1.0 - p) / m_total
        deff = max(1.0, var_cluster / var_binom)
        n_eff = m_total / deff
    _, lo, hi = wilson(p * n_eff, n_eff, level)
    return {"p": p, "lo": lo, "hi": hi, "n_views": int(m_total), "n_objects": c, "n_eff": n_eff, "deff": deff}


def paired_difference(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray,
                      level: float = 0.95) -> dict[str, float]:
    """Difference of hit rates ``mean(a) - mean(b)`` on paired samples (``a[i]`` and ``b[i]`` share sample i's
    initial noise), with Newcombe's (1998) hybrid score interval for paired proportions (his method 10).

    With the 2×2 table of pairs (both hit: n11; only a: n10; only b: n01; neither: n00), p1 = mean(a) and
    p2 = mean(b) get Wilson intervals (l1, u1) and (l2, u2), and with the continuity-corrected phi coefficient
    φ of the table (ad − bc reduced by n/2 towards 0 when positive, 0 if any margin is empty)::

        lo = d − sqrt((p1 − l1)² − 2φ (p1 − l1)(u2 − p2) + (u2 − p2)²)
        hi = d + sqrt((u1 − p1)² − 2φ (u1 − p1)(p2 − l2) + (p2 − l2)²)

    Returns diff, lo, hi, p_a, p_b, n and the discordant counts n10, n01 (all hits equal: diff 0, lo = −hi).
    """
    x, y = _binary(a, "a"), _binary(b, "b")
    if x.shape != y.shape:
        raise ClipdiffError(f"paired hits must have the same length, got {x.size} and {y.size}")
    n = float(x.size)
    n11 = float((x * y).sum())
    n10 = float((x * (1 - y)).sum())
    n01 = float(((1 - x) * y).sum())
    n00 = n - n11 - n10 - n01
    p1, l1, u1 = wilson(n11 + n10, n, level)
    p2, l2, u2 = wilson(n11 + n01, n, level)
    margins = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    phi = 0.0
    if margins > 0:
        cross = n11 * n00 - n10 * n01
        if cross > n / 2.0:
            phi = (cross - n / 2.0) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"diff": d, "lo": max(-1.0, lo), "hi": min(1.0, hi), "p_a": p1, "p_b": p2, "n": int(n),
            "n10": int(n10), "n01": int(n01)}


def seed_spread(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Aggregate one metric over training seeds: mean, sample std (ddof 1), min, max, n and a Student-t interval
    for the mean (``lo``, ``hi``). With one seed the std and the interval are NaN: one run says nothing about spread.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ClipdiffError("a spread over seeds needs at least one value")
    if not np.isfinite(v).all():
        raise ClipdiffError(f"a spread over seeds needs finite values, got {v.tolist()}")
    _z(level)
    mean = float(v.mean())
    out = {"mean": mean, "std": math.nan, "min": float(v.min()), "max": float(v.max()), "n": int(v.size),
           "lo": math.nan, "hi": math.nan}
    if v.size > 1:
        std = float(v.std(ddof=1))
        half = float(sps.t.ppf(0.5 + level / 2.0, v.size - 1)) * std / math.sqrt(v.size)
        out.update(std=std, lo=mean - half, hi=mean + half)
    return out
