"""The judge's control images (clipdiff.eval.controls), its synthetic outliers (judge_outliers) and the control
table (clipdiff.eval.judge_controls) on a tiny judge."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdiff.errors import ClipdiffError
from clipdiff.eval import controls
from clipdiff.eval.judge_controls import control_row
from clipdiff.eval.report import slug
from clipdiff.models.components.judge import Judge
from clipdiff.models.components.judge_outliers import (
    half_mix,
    make_outliers,
    tile_shuffle,
    uniform_cross_entropy,
)

VOCAB = ["a blue car", "a red jeep/bus", "a white car"]


def renders(n: int = 4, size: int = 32) -> torch.Tensor:
    """White images with a shaded box (a 'car') whose pixels vary: something for the controls to flatten."""
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(n, 3, size, size)
    shade = torch.linspace(0.2, 0.8, size - 12).view(1, 1, 1, -1)
    x[:, :, 10:22, 6:size - 6] = shade * torch.rand(n, 3, 1, 1, generator=gen)
    return x


def test_flat_silhouette_fills_the_car_with_its_mean_colour():
    x = renders()
    mask = controls.car_mask(x)
    assert mask.sum() == 4 * 12 * 20  # exactly the box
    y = controls.flat_silhouette(x)
    assert torch.equal(y[~mask.expand_as(x)], x[~mask.expand_as(x)])  # background untouched
    for i in range(len(x)):
        inside = y[i][:, mask[i, 0]]
        torch.testing.assert_close(inside, x[i][:, mask[i, 0]].mean(dim=1, keepdim=True).expand_as(inside))


def test_colour_matched_noise_keeps_the_channel_statistics():
    x = renders(2, 64)
    mask = controls.car_mask(x)
    y = controls.noise_inside(x, torch.Generator().manual_seed(1))
    assert torch.equal(y[~mask.expand_as(x)], x[~mask.expand_as(x)])
    for i in range(2):
        a, b = x[i][:, mask[i, 0]], y[i][:, mask[i, 0]]
        torch.testing.assert_close(b.mean(1), a.mean(1), atol=0.02, rtol=0)
        torch.testing.assert_close(b.std(1), a.std(1), atol=0.02, rtol=0)
        assert (b[:, 1:] - b[:, :-1]).abs().mean() > 2 * (a[:, 1:] - a[:, :-1]).abs().mean()  # no smooth shading
    z = controls.noise_image(x, torch.Generator().manual_seed(2))  # mostly white images: a U-shaped beta
    assert 0 <= z.min() and z.max() <= 1
    torch.testing.assert_close(z.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(dim=(2, 3)), x.std(dim=(2, 3)), atol=0.02, rtol=0)
    assert torch.equal(z, controls.noise_image(x, torch.Generator().manual_seed(2)))  # seeded


def test_synthetic_outliers_rearrange_real_pixels():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    t = tile_shuffle(x, 4)

    def tiles(im):  # the 16 tiles of 4×4 px (all channels) of a [3, 16, 16] image, as a sorted list
        return sorted(im.unfold(1, 4, 4).unfold(2, 4, 4).reshape(3, 16, 16).permute(1, 0, 2).reshape(16, -1).tolist())

    for i in range(6):
        assert tiles(t[i]) == tiles(x[i]) and not torch.equal(t[i], x[i])  # the same tiles, elsewhere
    m = half_mix(x)
    partner = x.roll(1, dims=0)
    from_x, from_partner = m == x, m == partner
    assert (from_x | from_partner).all() and from_x.any() and from_partner.any()
    assert make_outliers(x).shape == x.shape
    with pytest.raises(ValueError):
        make_outliers(x, ["noise"])
    assert uniform_cross_entropy(torch.zeros(5, 4)).item() == pytest.approx(math.log(4))
    assert uniform_cross_entropy(torch.tensor([[9.0, 0, 0, 0]])).item() > math.log(4)


def test_control_row_and_sample_folders(tmp_path: Path):
    judge = Judge(VOCAB, image_size=16, type_net={"widths": [8], "blocks": [1]},
                  colour_net={"widths": [8], "blocks": [1]})
    with torch.no_grad():
        feats = judge.embed(torch.rand(10, 3, 16, 16))
    judge.calibrate(feats, feats, quantile=0.0)
    with torch.no_grad():  # always "a white car"'s parts
        judge.colour_net.head[-1].bias.fill_(-1e4)[judge.colour_names.index("white")] = 1e4
        judge.type_net.head[-1].bias.fill_(-1e4)[judge.type_names.index("car")] = 1e4
    for caption, n in (("a white car", 3), ("a red jeep/bus", 1)):
        folder = tmp_path / "samples" / slug(caption)
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / f"{i:04d}.png")
    images, captions = controls.load_sample_folder(tmp_path / "samples", VOCAB)
    assert images.shape == (4, 3, 16, 16) and captions == ["a red jeep/bus"] + ["a white car"] * 3
    judge.threshold.fill_(-2.0)  # the lowest possible score: nothing refused
    row = control_row(judge, "s", images, captions)
    assert row["majority_type"] == 0.75 and row["pred_car"] == 1.0 and row["pred_jeep/bus"] == 0.0
    assert row["type_raw"] == row["caption_raw"] == 0.75 and row["colour_raw"] == 0.75
    assert row["passed"] == 1.0 and row["type"] == row["caption"] == 0.75
    judge.threshold.fill_(1.0)  # above any score: everything refused, so every judged part is wrong
    row = control_row(judge, "s", images, captions)
    assert row["passed"] == 0.0 and row["type"] == row["colour"] == row["caption"] == 0.0 and row["type_raw"] == 0.75
    with pytest.raises(ClipdiffError, match="unknown"):
        (tmp_path / "samples" / "a_pink_car").mkdir()
        controls.load_sample_folder(tmp_path / "samples", VOCAB)
