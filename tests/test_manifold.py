"""Improved precision/recall (Kynkäänniemi et al., 2019) on point clouds whose answer is known."""

from __future__ import annotations

import pytest
import torch

from clipdiff.errors import ClipdiffError
from clipdiff.eval import manifold
from clipdiff.eval.manifold import inside, knn_radii, precision_recall


def _blob(n: int, dim: int, centre: float, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += centre
    return x


def test_identical_sets_give_one_and_one():
    x = _blob(50, 8, 0.0, 0)
    r = precision_recall(x, x.clone())
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["fake_inside_real"].all() and r["fake_inside_real"].shape == (50,)


def test_far_apart_sets_give_zero_and_zero():
    r = precision_recall(_blob(60, 8, 0.0, 0), _blob(40, 8, 100.0, 1))
    assert r["precision"] == 0.0 and r["recall"] == 0.0
    assert (r["n_real"], r["n_fake"], r["real_inside_fake"].shape) == (60, 40, (60,))


def test_samples_covering_half_the_modes_have_half_the_recall_and_full_precision():
    """Real data has two far-apart modes; samples from one mode are all realistic but cover half the variety."""
    real = torch.cat([_blob(300, 4, 0.0, 0), _blob(300, 4, 30.0, 1)])
    half = _blob(300, 4, 0.0, 2)
    full = torch.cat([_blob(150, 4, 0.0, 3), _blob(150, 4, 30.0, 4)])
    r_half, r_full = precision_recall(real, half), precision_recall(real, full)
    assert r_half["precision"] > 0.85 and abs(r_half["precision"] - r_full["precision"]) < 0.1
    assert r_full["recall"] > 0.8
    assert 0.4 < r_half["recall"] / r_full["recall"] < 0.6
    assert not r_half["real_inside_fake"][300:].any()  # the missed mode is never covered


def test_knn_radius_is_the_kth_neighbour_excluding_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_chunked_distances_match_a_plain_loop(monkeypatch):
    monkeypatch.setattr(manifold, "_CHUNK", 7)  # several chunks and a ragged last one
    real, fake = _blob(40, 5, 0.0, 5), _blob(30, 5, 1.0, 6)
    got = precision_recall(real, fake, k=3)
    rad = torch.stack([torch.sort(((real - p) ** 2).sum(1).sqrt().double()).values[3] for p in real.double()])
    expect = torch.stack([(((real - q) ** 2).sum(1).sqrt().double() <= rad).any() for q in fake.double()])
    assert torch.equal(got["fake_inside_real"], expect)
    assert torch.equal(inside(fake, real, rad), expect)


def test_bad_input_raises_one_line():
    with pytest.raises(ClipdiffError, match="at least 4 fake"):
        precision_recall(torch.randn(10, 3), torch.randn(3, 3))
    with pytest.raises(ClipdiffError, match="differ in width"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ClipdiffError, match="2-D"):
        precision_recall(torch.randn(10, 3, 1), torch.randn(10, 3))
    with pytest.raises(ClipdiffError, match="k must be"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 3), k=0)
    with pytest.raises(ClipdiffError, match="NaN"):
        precision_recall(torch.full((10, 3), float("nan")), torch.randn(10, 3))
