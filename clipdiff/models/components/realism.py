"""The realism feature network: a small ResNet trained to tell the camera pose from grey images.

Its features are the space of the project's own realism measures (FD, KID, precision/recall; see
:mod:`clipdiff.eval.realism`). It shares nothing with a guide or a caption classifier: it never sees colour (its
input is luminance) and never sees a caption; its task, the camera's direction, needs the car's shape, its parts
and their depth order. Plain ``nn.Module`` parts, free of Lightning:

- :class:`RealismNet` — ``forward(x01) -> [B, 3]`` camera-direction regression; ``features(x01) -> [B, D]`` the
  pooled features; takes RGB images in [0, 1] of any size (converts to grey and resizes itself).
- :func:`load_realism` — the net back from an ``export.pt`` (kind ``realism``), in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.transforms.functional import rgb_to_grayscale

from clipdiff.errors import ClipdiffError
from clipdiff.models.components.small_resnet import resnet_stage
from clipdiff.models.export import load_export


class RealismNet(nn.Module):
    """Compact ResNet on luminance: a 3×3 stem (``stem_stride``), one torchvision ``BasicBlock`` stage per entry of
    ``widths`` / ``blocks`` / ``strides``, global average pooling and a linear head to ``outputs`` numbers (the
    camera direction, unnormalised).

    ``features`` concatenates the globally average-pooled activations of the stages listed in ``feature_stages``
    (indices into ``widths``; default the last), so ``num_features`` is the sum of their widths.
    """

    def __init__(self, image_size: int = 32, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 1, 1), strides: Sequence[int] = (1, 2, 2, 2), stem_stride: int = 2,
                 feature_stages: Sequence[int] = (-1,), outputs: int = 3, mean: float = 0.5, std: float = 0.25):
        super().__init__()
        if not widths or not len(widths) == len(blocks) == len(strides):
            raise ClipdiffError(f"realism net widths {list(widths)}, blocks {list(blocks)} and strides {list(strides)} "
                                "need the same, non-zero length (model.net.*)")
        stages_used = sorted({i % len(widths) for i in feature_stages}) if feature_stages else []
        if not stages_used or any(not -len(widths) <= i < len(widths) for i in feature_stages):
            raise ClipdiffError(f"model.net.feature_stages={list(feature_stages)}: give stage indices in "
                                f"[{-len(widths)}, {len(widths) - 1}]")
        self.config = {"image_size": int(image_size), "widths": list(widths), "blocks": list(blocks),
                       "strides": list(strides), "stem_stride": int(stem_stride),
                       "feature_stages": list(feature_stages), "outputs": int(outputs), "mean": float(mean),
                       "std": float(std)}
        self.image_size = int(image_size)
        self.feature_stages = stages_used
        self.num_features = sum(widths[i] for i in stages_used)
        self.mean, self.std = float(mean), float(std)
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        cins = [widths[0], *widths[:-1]]
        self.stages = nn.ModuleList(resnet_stage(c, w, n, s) for c, w, n, s in zip(cins, widths, blocks, strides))
        self.head = nn.Linear(widths[-1], outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, BasicBlock):  # each residual branch starts at zero (torchvision's zero_init_residual)
                nn.init.zeros_(m.bn2.weight)

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] (uint8 0..255 accepted) → normalised luminance [B, 1, S, S] at the net's size S
        (ITU-R BT.601 weights, torchvision's ``rgb_to_grayscale``)."""
        if x01.ndim != 4 or x01.shape[1] != 3:
            raise ClipdiffError(f"the realism net takes RGB images [B, 3, H, W] in [0, 1], got shape {list(x01.shape)}")
        x = x01.float() / 255.0 if x01.dtype == torch.uint8 else x01.float()
        x = rgb_to_grayscale(x)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    def _trunk(self, x01: torch.Tensor) -> list[torch.Tensor]:
        h, maps = self.stem(self.prepare(x01)), []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """The predicted camera direction (unnormalised, [B, outputs])."""
        return self.head(self._trunk(x01)[-1].mean(dim=(2, 3)))

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Realism features [B, num_features]: pooled activations of ``feature_stages``."""
        maps = self._trunk(x01)
        return torch.cat([maps[i].mean(dim=(2, 3)) for i in self.feature_stages], dim=1)


def load_realism(path: str | Path, key: str = "realism_ckpt", map_location: str | torch.device = "cpu") -> RealismNet:
    """The realism net of an ``export.pt`` (or a run directory holding one), in eval mode.

    Any other file (missing, a Lightning checkpoint, another kind of model) fails with one ClipdiffError line
    naming ``key``.
    """
    obj = load_export(path, "realism", key=key)
    try:
        net = RealismNet(**obj["config"])
        net.load_state_dict(obj["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ClipdiffError(f"{key}={path}: a damaged realism export ({type(e).__name__}); train it again with "
                            "`python -m clipdiff.train model=realism`") from None
    return net.to(map_location).eval()
