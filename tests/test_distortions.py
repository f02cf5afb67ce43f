"""Graded distortions (clipdiff.eval.distortions): identity at 0, more change with strength, seeded, white kept."""

from __future__ import annotations

import pytest
import torch

from clipdiff.errors import ClipdiffError
from clipdiff.eval.distortions import DISTORTIONS, blob_images, distort, silhouette

RANDOM_KINDS = ("noise", "patch_shuffle", "blobs")


def cars(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Car-like images: a white background, a shaded body of a random colour with a dark window and wheels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 3, size, size)
    colour = 0.2 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)
    shade = torch.linspace(0.7, 1.0, size).view(1, 1, 1, size)
    body = (slice(None), slice(None), slice(size // 3, 3 * size // 4), slice(size // 8, 7 * size // 8))
    x[body] = (colour * shade).expand(n, 3, size, size)[body]
    x[:, :, size // 3 : size // 2, size // 3 : 2 * size // 3] = 0.15  # window
    x[:, :, 3 * size // 4 - 2 : 3 * size // 4 + 2, size // 5 : size // 5 + 4] = 0.05  # wheels
    x[:, :, 3 * size // 4 - 2 : 3 * size // 4 + 2, 4 * size // 5 - 4 : 4 * size // 5] = 0.05
    return x


@pytest.mark.parametrize("kind", list(DISTORTIONS))
def test_identity_at_zero_and_more_change_with_strength(kind: str):
    x = cars()
    same = distort(x, kind, 0.0, seed=3)
    assert torch.equal(same, x) and same is not x
    change = [(distort(x, kind, s, seed=3) - x).abs().mean().item() for s in (0.25, 0.5, 1.0)]
    assert 0 < change[0] < change[1] < change[2], change
    out = distort(x, kind, 1.0, seed=3)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kind", list(DISTORTIONS))
def test_same_seed_same_output(kind: str):
    x = cars()
    assert torch.equal(distort(x, kind, 0.6, seed=5), distort(x, kind, 0.6, seed=5))
    if kind in RANDOM_KINDS:
        assert not torch.equal(distort(x, kind, 0.6, seed=5), distort(x, kind, 0.6, seed=6))


def test_hue_shift_keeps_the_white_background_and_greys_and_changes_colours():
    x = cars()
    x[:, :, :4, :4] = 0.5  # a grey corner
    out = distort(x, "hue_shift", 1.0)
    background = silhouette(x)[:, 0] == 0
    assert torch.allclose(out.permute(0, 2, 3, 1)[background], torch.ones(1, 3), atol=1e-6)
    torch.testing.assert_close(out[:, :, :4, :4], x[:, :, :4, :4], atol=1e-6, rtol=0)
    coloured = (x.amax(1) - x.amin(1)) > 0.1
    assert (out - x).abs().sum(1)[coloured].mean() > 0.1


def test_flat_silhouette_fills_the_object_with_one_colour_and_leaves_the_background():
    x = cars()
    mask = silhouette(x)[:, 0].bool()
    out = distort(x, "flat_silhouette", 1.0)
    for i in range(len(x)):
        inside = out[i].permute(1, 2, 0)[mask[i]]
        assert torch.allclose(inside, inside[0].expand_as(inside), atol=1e-6)  # one flat colour
        torch.testing.assert_close(inside[0], x[i].permute(1, 2, 0)[mask[i]].mean(0))  # its mean colour
    assert torch.equal(out.permute(0, 2, 3, 1)[~mask], x.permute(0, 2, 3, 1)[~mask])
    random = distort(x, "flat_silhouette", 1.0, seed=1, flat_colour="random")
    assert not torch.allclose(random, out)


def test_patch_shuffle_moves_patches_without_changing_them():
    x = cars(n=3)
    out = distort(x, "patch_shuffle", 1.0, seed=2)

    def patches(t: torch.Tensor) -> torch.Tensor:  # [N, 16 patches, 3*8*8], sorted per image
        p = t.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(len(t), 16, -1)
        return p[torch.arange(len(t))[:, None], p.sum(-1).argsort(1)]

    torch.testing.assert_close(patches(out), patches(x))
    assert not torch.equal(out, x)


def test_blobs_are_coloured_shapes_on_white():
    b = blob_images(8, 32, 32, torch.Generator().manual_seed(0))
    assert b.shape == (8, 3, 32, 32) and b.min() >= 0 and b.max() <= 1
    torch.testing.assert_close(distort(cars(8), "blobs", 1.0, seed=0), b)  # strength 1: the blobs alone
    corners = b[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners > 0.95).float().mean() > 0.9  # white around the shapes
    fg = silhouette(b)[:, 0].float().mean((1, 2))
    assert (fg > 0.03).all() and (fg < 0.9).all()
    saturation = (b.amax(1) - b.amin(1))[silhouette(b)[:, 0].bool()]
    assert saturation.mean() > 0.3


def test_bad_input_is_one_line():
    x = cars(2)
    for call, words in [(lambda: distort(x, "swirl", 0.5), "swirl"), (lambda: distort(x, "noise", 1.5), "[0, 1]"),
                        (lambda: distort(x[:, :1], "noise", 0.5), "[N, 3, H, W]"),
                        (lambda: distort((x * 255).byte(), "noise", 0.5), "float")]:
        with pytest.raises(ClipdiffError, match=None) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)
