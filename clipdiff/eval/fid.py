"""Fréchet distance (FD) and KID between generated and real images in a feature space of the project's own.

No download: torchmetrics' ``FrechetInceptionDistance``/``KernelInceptionDistance`` are given a custom ``feature``
module. The intended feature space is the image tower of a trained clipdiff CLIP (:func:`clip_features` takes the
loaded model); :class:`RandomConvFeatures` is a fixed, seeded random conv net for tests or when no CLIP is trained yet. The
numbers are comparable only within one feature space: always report which one.

``python -m clipdiff.eval.fid --fake RUN/samples --real DATA_ROOT [--split cars_val] [--clip EXPORT]``
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdiff.utils.images import float_images

log = logging.getLogger(__name__)

Images = torch.Tensor | Iterable[torch.Tensor | Mapping[str, Any]]


class FeatureSpace(nn.Module):
    """Wrap ``encode(images01) -> [B, D]`` for torchmetrics: float images in [0, 1] (uint8 accepted), optional resize."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor] | nn.Module, num_features: int | None = None,
                 image_size: int | None = None, name: str = "custom"):
        super().__init__()
        self.encode = encode
        self.image_size = image_size
        self.name = name
        if num_features is None:
            with torch.no_grad():
                num_features = int(self._features(torch.rand(2, 3, image_size or 32, image_size or 32)).shape[-1])
        self.num_features = num_features

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = float_images(x)
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.encode(x).flatten(1).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)


class RandomConvFeatures(nn.Module):
    """A fixed random conv net (seeded): a weak but reproducible feature space when no CLIP export exists."""

    def __init__(self, dim: int = 128, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, dim, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * dim, dim),
        )
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5)
        self.requires_grad_(False).eval()

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(x01 * 2 - 1)


def clip_features(model: nn.Module, name: str = "clip") -> FeatureSpace:
    """The image tower of a loaded clipdiff CLIP (``model.encode_image`` on images in [0, 1]) as a feature space,
    on the model's device; ``name`` says which CLIP (e.g. its export path) in reports."""
    device = next(model.parameters()).device
    return FeatureSpace(model.eval().encode_image, name=name).to(device)


def random_features(dim: int = 128, seed: int = 0) -> FeatureSpace:
    return FeatureSpace(RandomConvFeatures(dim, seed), num_features=dim, name=f"random-conv(dim={dim},seed={seed})")


def _batches(images: Images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    for b in images:
        yield b["image"] if isinstance(b, Mapping) else b


class _Precomputed(nn.Module):
    """Identity 'network' so both torchmetrics metrics take features computed once by the caller."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


@torch.no_grad()
def fd_kid(fake: Images, real: Images, feature: nn.Module | Callable[[torch.Tensor], torch.Tensor], *,
           batch_size: int = 256, kid_subsets: int = 50, kid_subset_size: int | None = None,
           device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """FD and KID between ``fake`` and ``real`` images in the feature space ``feature`` (images in [0, 1] → [B, D]).

    ``fake``/``real``: tensors [N, 3, H, W] in [0, 1], or iterables of such batches or of DataModule batch dicts.
    KID uses subsets of min(1000, N_fake, N_real) images unless ``kid_subset_size`` is given; its random subsets
    come from ``seed`` (the global RNG is left untouched). Returns fd, kid, kid_std, counts and the space's name.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    space = feature if isinstance(feature, FeatureSpace) else FeatureSpace(feature)
    space = space.to(device).eval()
    feats: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for is_real, source in ((True, real), (False, fake)):
        for b in _batches(source, batch_size):
            feats[is_real].append(space(b.to(device)).double().cpu())
    real_f, fake_f = torch.cat(feats[True]), torch.cat(feats[False])
    if min(len(real_f), len(fake_f)) < 2:
        raise ValueError(f"FD/KID need at least 2 images on each side (real {len(real_f)}, fake {len(fake_f)})")
    subset = kid_subset_size or min(1000, len(real_f), len(fake_f))
    ident = _Precomputed(real_f.shape[1])
    fd = FrechetInceptionDistance(feature=ident, normalize=True)
    kid = KernelInceptionDistance(feature=ident, normalize=True, subsets=kid_subsets, subset_size=subset)
    for metric in (fd, kid):
        metric.update(real_f, real=True)
        metric.update(fake_f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fd": float(fd.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "n_fake": len(fake_f),
            "n_real": len(real_f), "kid_subset_size": subset, "features": getattr(space, "name", "custom")}


def load_png_dir(folder: str | Path, limit: int | None = None) -> torch.Tensor:
    """Every ``*.png`` under ``folder`` (sorted) as float [N, 3, H, W] in [0, 1]."""
    import numpy as np
    from PIL import Image

    paths = sorted(Path(folder).rglob("*.png"))[:limit]
    if not paths:
        raise FileNotFoundError(f"no PNG images under {folder}")
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m clipdiff.eval.fid", description=__doc__.split("\n")[0])
    ap.add_argument("--fake", required=True, help="folder of generated PNGs (e.g. a sample run's samples/)")
    ap.add_argument("--real", required=True, help="dataset root (SRN layout)")
    ap.add_argument("--captions", default=None, help="caption file/folder (default: ROOT/ground_truth.tsv or ROOT/cars_text)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--num-real", type=int, default=2000)
    ap.add_argument("--clip", default=None, help="a CLIP export.pt: its image tower is the feature space")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from clipdiff.data.datamodule import CarsDataModule

    fake = load_png_dir(args.fake)
    captions = args.captions or next((str(p) for p in (Path(args.real) / "ground_truth.tsv",) if p.is_file()), None)
    dm = CarsDataModule(args.real, captions=captions, image_size=fake.shape[-1], cache=False, progress=False,
                        splits={args.split: f"cars_{args.split}"}, eval_views_per_object=None)
    ds = dm._dataset(args.split)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[: args.num_real]
    real = ds.float_images(idx)
    if args.clip:
        from clipdiff.models.components.clip import load_clip

        space = clip_features(load_clip(args.clip, key="--clip"), name=f"clip:{args.clip}")
    else:
        space = random_features(seed=args.seed)
    result = fd_kid(fake, real, space, seed=args.seed)
    print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
