"""Intervals for proportions, clustered proportions, paired differences and seed spread against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from clipdiff.errors import ClipdiffError
from clipdiff.eval.stats import clustered_proportion, jeffreys, paired_difference, seed_spread, wilson

# Wilson 95% intervals published by Newcombe (1998, Stat Med 17:857, Table II, method 3)
NEWCOMBE_WILSON = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611)),
                   ((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize(("kn", "bounds"), NEWCOMBE_WILSON)
def test_wilson_matches_textbook_values(kn, bounds):
    p, lo, hi = wilson(*kn)
    assert p == pytest.approx(kn[0] / kn[1])
    assert (lo, hi) == pytest.approx(bounds, abs=6e-5)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (16, 16), (3, 7), (99, 100)])
def test_wilson_agrees_with_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n)[1:] == pytest.approx((ci.low, ci.high), abs=1e-12)
    ci90 = sps.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson(k, n, level=0.9)[1:] == pytest.approx((ci90.low, ci90.high), abs=1e-12)


@pytest.mark.parametrize("interval", [wilson, jeffreys])
def test_interval_is_not_degenerate_at_zero_and_n(interval):
    p, lo, hi = interval(16, 16)
    assert p == 1.0 and hi == 1.0 and 0.75 < lo < 0.9  # never [1, 1] from 16 hits
    p, lo, hi = interval(0, 16)
    assert p == 0.0 and lo == 0.0 and 0.1 < hi < 0.25
    # mirror symmetry: k of n hits is n - k misses
    _, lo7, hi7 = interval(7, 20)
    _, lo13, hi13 = interval(13, 20)
    assert (lo7, hi7) == pytest.approx((1 - hi13, 1 - lo13))


@pytest.mark.parametrize("interval", [wilson, jeffreys])
@pytest.mark.parametrize("true_p", [0.02, 0.5, 0.9, 0.98])
def test_exact_coverage_is_close_to_nominal(interval, true_p):
    """Coverage computed exactly over the binomial distribution, n = 16: neither collapsed nor vacuous."""
    n = 16
    pmf = sps.binom.pmf(np.arange(n + 1), n, true_p)
    covered = [interval(k, n)[1] <= true_p <= interval(k, n)[2] for k in range(n + 1)]
    coverage = float(pmf[covered].sum())
    widths = [interval(k, n)[2] - interval(k, n)[1] for k in range(n + 1)]
    assert coverage > 0.85 and min(widths) > 0.1


def test_jeffreys_is_the_beta_posterior_and_close_to_wilson_at_large_n():
    _, lo, hi = jeffreys(5, 10)
    # equal tails: 2.5% of Beta(5.5, 5.5) below lo and above hi
    assert sps.beta.cdf(lo, 5.5, 5.5) == pytest.approx(0.025) and sps.beta.sf(hi, 5.5, 5.5) == pytest.approx(0.025)
    assert jeffreys(500, 1000)[1:] == pytest.approx(wilson(500, 1000)[1:], abs=1e-3)


@pytest.mark.parametrize(("k", "n"), [(3, 0), (-1, 5), (6, 5), (float("nan"), 5)])
def test_bad_counts_raise_one_line(k, n):
    for interval in (wilson, jeffreys):
        with pytest.raises(ClipdiffError, match="proportion needs"):
            interval(k, n)
    with pytest.raises(ClipdiffError, match="level"):
        wilson(1, 2, level=95)


# ---- clustered proportion ------------------------------------------------------------------------------------

def test_clustered_one_view_per_object_is_plain_wilson():
    rng = np.random.default_rng(0)
    hits = rng.random(40) < 0.7
    r = clustered_proportion(hits, np.arange(40))
    assert (r["p"], r["lo"], r["hi"]) == pytest.approx(wilson(int(hits.sum()), 40))
    assert r["deff"] == 1.0 and r["n_objects"] == 40


def test_clustered_views_that_always_agree_count_as_one_trial_per_object():
    obj_hit = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)  # 7 of 10 objects
    views = 16
    hits = np.repeat(obj_hit, views)
    r = clustered_proportion(hits, np.repeat(np.arange(10), views))
    assert r["n_eff"] == pytest.approx(10) and r["deff"] == pytest.approx(views)
    assert (r["lo"], r["hi"]) == pytest.approx(wilson(7, 10)[1:])
    # the naive interval over 160 views is far narrower
    assert wilson(112, 160)[2] - wilson(112, 160)[1] < 0.6 * (r["hi"] - r["lo"])


def test_clustered_all_hits_is_not_one_one():
    r = clustered_proportion(np.ones(16 * 8, bool), np.repeat(np.arange(8), 16))
    assert r["p"] == 1.0 and r["hi"] == 1.0
    assert r["lo"] == pytest.approx(wilson(8, 8)[1]) and r["lo"] < 0.8


def test_clustered_independent_views_keep_most_of_the_sample():
    rng = np.random.default_rng(1)
    hits = rng.random(60 * 16) < 0.6  # views independent of their object
    r = clustered_proportion(hits, np.repeat(np.arange(60), 16))
    assert r["n_eff"] > 0.6 * r["n_views"]


def test_clustered_bad_input():
    with pytest.raises(ClipdiffError, match="same length"):
        clustered_proportion([1, 0, 1], [0, 1])
    with pytest.raises(ClipdiffError, match="at least 2 objects"):
        clustered_proportion([1, 0, 1], [5, 5, 5])
    with pytest.raises(ClipdiffError, match="0/1"):
        clustered_proportion([1, 2, 1], [0, 1, 2])


# ---- paired difference ---------------------------------------------------------------------------------------

def _pairs(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00, bool)
    b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00, bool)
    return a, b


def test_paired_difference_matches_published_example():
    """Cavo et al. (2012) table as analysed by Fagerland, Lydersen & Laake (Newcombe square-and-add):
    estimate -0.0621, 95% CI -0.1186 to -0.0046."""
    a, b = _pairs(59, 6, 16, 80)
    r = paired_difference(a, b)
    assert r["diff"] == pytest.approx(-0.0621, abs=5e-5)
    assert (r["lo"], r["hi"]) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    assert (r["n"], r["n10"], r["n01"]) == (161, 6, 16)


def test_paired_difference_depends_on_the_pairing():
    """Same margins, positively correlated pairs: narrower than the independent-samples (phi = 0) interval."""
    a, b = _pairs(40, 5, 15, 40)
    shuffled = paired_difference(a, np.random.default_rng(0).permutation(b))
    paired = paired_difference(a, b)
    assert paired["diff"] == pytest.approx(-0.10)
    assert paired["hi"] - paired["lo"] < 0.8 * (shuffled["hi"] - shuffled["lo"])
    assert paired["hi"] < 0  # 15 vs 5 discordant pairs of 100: clearly worse


def test_paired_difference_of_identical_hits_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    a = rng.random(64) < 0.4
    r = paired_difference(a, a.copy())
    assert r["diff"] == 0.0 and r["lo"] == pytest.approx(-r["hi"]) and 0 <= r["hi"] < 0.1
    allhit = paired_difference(np.ones(16), np.ones(16))
    assert allhit["diff"] == 0.0 and allhit["lo"] == pytest.approx(-allhit["hi"]) and allhit["hi"] > 0


def test_paired_difference_is_antisymmetric_and_bounded():
    a, b = _pairs(3, 10, 0, 3)
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert (ab["diff"], ab["lo"], ab["hi"]) == pytest.approx((-ba["diff"], -ba["hi"], -ba["lo"]))
    extreme = paired_difference(np.ones(16), np.zeros(16))
    assert extreme["diff"] == 1.0 and extreme["hi"] == 1.0 and 0.5 < extreme["lo"] < 1.0


def test_paired_difference_bad_input():
    with pytest.raises(ClipdiffError, match="same length"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ClipdiffError, match="non-empty"):
        paired_difference([], [])


# ---- spread over seeds ---------------------------------------------------------------------------------------

def test_seed_spread_hand_computed():
    r = seed_spread([0.62, 0.71, 0.68])
    mean = (0.62 + 0.71 + 0.68) / 3
    std = math.sqrt(((0.62 - mean) ** 2 + (0.71 - mean) ** 2 + (0.68 - mean) ** 2) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2)
    assert r["mean"] == pytest.approx(mean) and r["std"] == pytest.approx(std)
    assert (r["lo"], r["hi"]) == pytest.approx((mean - half, mean + half))
    assert (r["min"], r["max"], r["n"]) == (0.62, 0.71, 3)


def test_seed_spread_one_seed_has_no_spread_and_bad_input_raises():
    r = seed_spread([0.5])
    assert r["mean"] == 0.5 and r["n"] == 1 and math.isnan(r["std"]) and math.isnan(r["lo"])
    with pytest.raises(ClipdiffError, match="at least one"):
        seed_spread([])
    with pytest.raises(ClipdiffError, match="finite"):
        seed_spread([0.5, float("nan")])
