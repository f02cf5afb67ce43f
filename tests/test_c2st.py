"""Classifier two-sample test on tiny synthetic car silhouettes whose answer is known (16 px, 48 per set)."""

from __future__ import annotations

import pytest
import torch

from clipdiff.errors import ClipdiffError
from clipdiff.eval.c2st import LUMA, _batches, _deal, c2st, c2st_repeats, prepare

N = 48


def cars(n: int, seed: int, colour: tuple[float, float, float] = (0.8, 0.25, 0.2), size: int = 16) -> torch.Tensor:
    """Side views of boxy cars on white: body, cabin and two dark wheels at random proportions and place."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)) * size / 16

    length, x0, top, height = u(9, 13), u(1, 3), u(6, 8), u(2.5, 4)
    cab_x0, cab_len, cab_h = x0 + u(2, 4), u(3.5, 6), u(2, 3)
    y = torch.arange(size).view(1, -1, 1) + 0.5
    x = torch.arange(size).view(1, 1, -1) + 0.5
    body = (x >= x0) & (x < x0 + length) & (y >= top) & (y < top + height)
    cabin = (x >= cab_x0) & (x < cab_x0 + cab_len) & (y >= top - cab_h) & (y < top)
    r2 = (1.3 * size / 16) ** 2
    inset = 2.5 * size / 16
    wheels = (((x - x0 - inset) ** 2 + (y - top - height) ** 2) < r2) | (
        ((x - x0 - length + inset) ** 2 + (y - top - height) ** 2) < r2)
    img = torch.ones(n, 3, size, size)
    img = torch.where((body | cabin)[:, None], torch.tensor(colour).view(1, 3, 1, 1), img)
    return torch.where(wheels[:, None], torch.full_like(img, 0.15), img)


def shuffle_patches(x: torch.Tensor, patch: int = 4, seed: int = 0) -> torch.Tensor:
    """The same pixels with the patch grid permuted: colours and local texture kept, the shape destroyed."""
    n, c, h, w = x.shape
    tiles = x.unfold(2, patch, patch).unfold(3, patch, patch).reshape(n, c, -1, patch, patch)
    tiles = tiles[:, :, torch.randperm(tiles.shape[2], generator=torch.Generator().manual_seed(seed))]
    return tiles.reshape(n, c, h // patch, w // patch, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def equal_luma_colours() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A red and a blue of exactly the same Rec. 601 luminance: a pure change of hue for a grey image."""
    red = (0.8, 0.25, 0.2)
    luma = sum(w * c for w, c in zip(LUMA, red, strict=True))
    blue = (0.2, (luma - LUMA[0] * 0.2 - LUMA[2] * 0.8) / LUMA[1], 0.8)
    return red, blue


def test_two_draws_of_one_distribution_sit_at_chance():
    r = c2st(cars(N, seed=1), cars(N, seed=2))
    assert r["lo"] <= 0.5 <= r["hi"] and 0.35 < r["acc"] < 0.65
    assert (r["n"], r["n_test"], len(r["fold_acc"])) == (N, 2 * N, 5)


def test_shapes_destroyed_are_told_apart():
    r = c2st(cars(N, seed=1), shuffle_patches(cars(N, seed=2)))
    assert r["acc"] > 0.9 and r["lo"] > 0.8


def test_grey_mode_is_blind_to_a_pure_hue_change():
    red, blue = equal_luma_colours()
    a, b = cars(N, seed=1, colour=red), cars(N, seed=2, colour=blue)
    assert torch.allclose(prepare(a[:1], True, None).amin(), prepare(b[:1], True, None).amin(), atol=1e-6)
    rgb, grey = c2st(a, b), c2st(a, b, grey=True)
    assert rgb["acc"] > 0.9
    assert grey["lo"] <= 0.5 <= grey["hi"] and grey["acc"] < 0.7


def test_same_seed_same_result_and_larger_set_is_subsampled():
    a, b = cars(N + 20, seed=1), cars(N, seed=2)
    r1 = c2st(a, b, seed=3, folds=4, epochs=4)
    rep = c2st_repeats(a, b, repeats=2, seed=3, folds=4, epochs=4)
    assert rep["runs"][0] == r1 and rep["runs"][1]["seed"] == 4
    assert rep["acc"] == pytest.approx((r1["acc"] + rep["runs"][1]["acc"]) / 2) and rep["spread"]["n"] == 2
    assert r1["n"] == N and r1["folds"] == 4


def test_larger_images_are_downsampled_to_max_size():
    x = cars(4, seed=0, size=32)
    assert prepare(x, False, 16).shape == (4, 3, 16, 16) and prepare(x, True, None).shape == (4, 1, 32, 32)
    assert prepare(x, False, None).amin() >= -1 and prepare(x, False, None).amax() <= 1


def test_groups_keep_each_object_in_one_fold_and_widen_the_interval():
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(13).repeat_interleave(torch.tensor([1, 2, 3, 4] * 3 + [5]))[torch.randperm(35, generator=gen)]
    fold = _deal(groups, len(groups), 5, gen)
    for g in groups.unique():
        assert fold[groups == g].unique().numel() == 1
    sizes = torch.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 5  # whole groups, dealt to the emptiest fold
    a, b = cars(N, seed=1), cars(N, seed=2)
    objects = torch.arange(N) // 4  # 12 "objects" of 4 views each
    plain, grouped = c2st(a, b), c2st(a, b, groups_a=objects, groups_b=objects)
    assert grouped["n_eff"] < plain["n_eff"] == 2 * N


def test_bad_input_raises_one_line():
    a = cars(12, seed=0)
    with pytest.raises(ClipdiffError, match="at least 10 images"):
        c2st(a, a[:9])
    with pytest.raises(ClipdiffError, match="same image size"):
        c2st(a, cars(12, seed=0, size=32))
    with pytest.raises(ClipdiffError, match=r"\[N, 3, H, W\]"):
        c2st(a[:, :1], a)
    with pytest.raises(ClipdiffError, match="float"):
        c2st((a * 255).to(torch.uint8), a)
    with pytest.raises(ClipdiffError, match="one group id per image"):
        c2st(a, a, groups_a=torch.arange(5))
    with pytest.raises(ClipdiffError, match="at least 5 groups"):
        c2st(a, a, groups_a=torch.arange(12) % 3)
    with pytest.raises(ClipdiffError, match="at least 2 folds"):
        c2st(a, a, folds=1)


def test_each_net_trains_only_outside_its_fold():
    gen = torch.Generator().manual_seed(0)
    fold_of = torch.arange(23) % 5
    train = [torch.nonzero(fold_of != f).squeeze(1) for f in range(5)]
    index = _batches(train, epochs=3, batch_size=8, gen=gen)
    assert index.shape == (3 * 3, 8, 5)  # 3 passes over the largest set (19 images) in batches of 8
    for f in range(5):
        seen = index[:, :, f].flatten()
        assert not (fold_of[seen] == f).any()
        assert set(seen.tolist()) == set(train[f].tolist())  # every training image is used


def test_each_image_is_judged_by_the_net_that_never_saw_it(monkeypatch):
    """A perfect memoriser in place of the CNN: it knows the label of every image its net trained on and says
    nothing (logit 0) otherwise. Held out properly, it cannot beat chance; judged by a net that saw the image, it
    would score 1."""
    import clipdiff.eval.c2st as module

    class Memoriser(torch.nn.Module):
        def __init__(self, x, y, fold_of, folds):
            super().__init__()
            self.x, self.y, self.fold_of, self.folds = x, y, fold_of, folds

        def forward(self, xb):  # [B, k, C, H, W] -> [B, k]
            rows = (xb[:, 0, None] == self.x[None]).flatten(2).all(2).float().argmax(1)
            seen = self.fold_of[rows][:, None] != torch.arange(self.folds)[None]
            return torch.where(seen, self.y[rows][:, None] * 20 - 10, torch.zeros(()))

    monkeypatch.setattr(module, "_train", lambda x, y, fold_of, folds, seed, **kw: Memoriser(x, y, fold_of, folds))
    r = c2st(cars(N, seed=1), cars(N, seed=2))
    assert r["acc"] == 0.5
