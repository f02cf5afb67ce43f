"""Graded distortions of image batches: the controls that show a realism measure measures realism.

``distort(x, kind, strength, seed)`` takes float images ``[N, 3, H, W]`` in [0, 1] on a white background and a
strength in [0, 1]: 0 returns the images unchanged, 1 is the strongest form; the same seed gives the same output,
and the random draws of one seed are shared across strengths (a stronger setting of one seed moves the same pixels
further), so graded curves are smooth. All vectorised torch on the images' device.

- ``noise``: additive Gaussian noise of std ``0.5·s``.
- ``blur``: Gaussian blur of std ``s·H/16`` pixels (2 px at 32 px), edges replicated.
- ``patch_shuffle``: a 4×4 grid of patches; ``round(s·16)`` of them, chosen at random, swap places (each moves).
- ``flat_silhouette``: the silhouette (pixels that are not white) blended towards one flat colour, the mean colour
  of that image's silhouette (``flat_colour="random"``: a random saturated colour instead): shape kept, shading gone.
- ``blobs``: the image blended towards smooth random shapes of saturated colour on white (what an over-guided
  sampler draws).
- ``hue_shift``: hue rotated by ``s·180°`` (HSV, torchvision's ``adjust_hue``): greys and the white background stay.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import adjust_hue

from clipdiff.errors import ClipdiffError

WHITE_TOLERANCE = 8 / 255  # a pixel within this of white in every channel is background
GRID = 4  # patch_shuffle: GRID × GRID patches


def _noise(x: torch.Tensor, s: float, gen: torch.Generator, **_) -> torch.Tensor:
    return x + 0.5 * s * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of std ``sigma`` pixels, edges replicated (identity for sigma 0)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offsets / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    return y.view(n, c, h, w)


def _blur(x: torch.Tensor, s: float, gen: torch.Generator, **_) -> torch.Tensor:
    return gaussian_blur(x, s * x.shape[-2] / 16)


def _patch_shuffle(x: torch.Tensor, s: float, gen: torch.Generator, **_) -> torch.Tensor:
    n, c, h, w = x.shape
    ph, pw = h // GRID, w // GRID
    if ph == 0 or pw == 0:
        raise ClipdiffError(f"patch_shuffle needs images of at least {GRID}×{GRID} pixels, got {h}×{w}")
    p = GRID * GRID
    k = round(s * p)
    if k < 2:
        return x
    core = x[:, :, : GRID * ph, : GRID * pw]
    patches = core.reshape(n, c, GRID, ph, GRID, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, p, c, ph, pw)
    order = torch.rand(n, p, generator=gen, device=x.device).argsort(dim=1)[:, :k]  # the patches that move
    source = torch.arange(p, device=x.device).expand(n, p).clone()
    source.scatter_(1, order, order.roll(-1, dims=1))  # a cycle through the chosen patches: every one moves
    moved = patches.gather(1, source.view(n, p, 1, 1, 1).expand_as(patches))
    out = x.clone()
    out[:, :, : GRID * ph, : GRID * pw] = moved.view(n, GRID, GRID, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(
        n, c, GRID * ph, GRID * pw)
    return out


def silhouette(x: torch.Tensor) -> torch.Tensor:
    """Float mask [N, 1, H, W]: 1 where a pixel is not (near) white, the object and its shadow."""
    return (x < 1 - WHITE_TOLERANCE).any(dim=1, keepdim=True).to(x.dtype)


def _random_colours(n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Saturated random colours [n, 3] (HSV hue uniform, saturation 0.6-1, value 0.5-1)."""
    h, sat, val = torch.rand(3, n, generator=gen, device=device, dtype=dtype)
    sat, val = 0.6 + 0.4 * sat, 0.5 + 0.5 * val
    k = (torch.tensor([5.0, 3.0, 1.0], device=device, dtype=dtype)[None, :] + 6 * h[:, None]) % 6
    return val[:, None] - val[:, None] * sat[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _flat_silhouette(x: torch.Tensor, s: float, gen: torch.Generator, flat_colour: str = "mean",
                     **_) -> torch.Tensor:
    mask = silhouette(x)
    if flat_colour == "mean":
        colour = (x * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1.0)
    elif flat_colour == "random":
        colour = _random_colours(len(x), gen, x.device, x.dtype)
    else:
        raise ClipdiffError(f"flat_colour={flat_colour!r}: choose 'mean' (each silhouette's mean colour) or 'random'")
    return x + s * mask * (colour[:, :, None, None] - x)


def blob_images(n: int, h: int, w: int, gen: torch.Generator, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, blobs: int = 3) -> torch.Tensor:
    """``n`` images of ``blobs`` smooth random shapes of saturated colour on white, centred like a car."""
    field = torch.randn(n * blobs, 1, 5, 5, generator=gen, device=device, dtype=dtype)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).view(n, blobs, h, w)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=device, dtype=dtype),
                            torch.linspace(-1, 1, w, device=device, dtype=dtype), indexing="ij")
    field = field - 2.5 * (xx**2 + yy**2)  # shapes gather near the centre
    masks = torch.sigmoid(30 * (field - 0.2))  # crisp edges (a pixel or two at 32 px), like an over-guided sample's
    colours = _random_colours(n * blobs, gen, device, dtype).view(n, blobs, 3, 1, 1)
    out = torch.ones(n, 3, h, w, device=device, dtype=dtype)
    for b in range(blobs):  # painted one over the other (a loop over a few blobs, not over pixels)
        m = masks[:, b : b + 1]
        out = out + m * (colours[:, b] - out)
    return out


def _blobs(x: torch.Tensor, s: float, gen: torch.Generator, **_) -> torch.Tensor:
    n, _, h, w = x.shape
    return x + s * (blob_images(n, h, w, gen, x.device, x.dtype) - x)


def _hue_shift(x: torch.Tensor, s: float, gen: torch.Generator, **_) -> torch.Tensor:
    return adjust_hue(x, 0.5 * s)


DISTORTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "noise": _noise, "blur": _blur, "patch_shuffle": _patch_shuffle, "flat_silhouette": _flat_silhouette,
    "blobs": _blobs, "hue_shift": _hue_shift,
}


def distort(x: torch.Tensor, kind: str, strength: float, seed: int = 0, **options) -> torch.Tensor:
    """``x`` (float [N, 3, H, W] in [0, 1]) distorted by ``kind`` at ``strength`` in [0, 1], drawn from ``seed``:
    a new tensor in [0, 1]; strength 0 returns an unchanged copy. ``options``: ``flat_colour`` for flat_silhouette."""
    if kind not in DISTORTIONS:
        raise ClipdiffError(f"distortion {kind!r} is unknown: choose one of {', '.join(DISTORTIONS)}")
    if not 0.0 <= float(strength) <= 1.0:
        raise ClipdiffError(f"distortion strength {strength!r} must be in [0, 1] (0 = unchanged)")
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ClipdiffError(f"distortions take float images [N, 3, H, W] in [0, 1], got {x.dtype} {list(x.shape)}")
    if strength == 0:
        return x.clone()
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    return DISTORTIONS[kind](x, float(strength), gen, **options).clamp(0.0, 1.0)
