"""A compact ResNet for small renders, and the luminance that makes one colour-blind.

:class:`SmallResNet` — a 3×3 stride-1 stem, one stage of torchvision ``BasicBlock``s per entry of ``widths`` /
``blocks`` / ``strides``, global average pooling (the *features*), dropout and a linear head. It takes images in
[0, 1] of any size, resizes them to its own ``image_size`` and normalises them itself. With ``in_channels=1`` it
first reduces the image to its :func:`luminance`, so nothing it computes can depend on hue or saturation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from clipdiff.errors import ClipdiffError

# ITU-R BT.601 luma weights (they sum to 1: a grey pixel keeps its value)
LUMA = (0.299, 0.587, 0.114)


def luminance(x01: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → [B, 1, H, W]: the BT.601 weighted sum of R, G and B."""
    w = torch.tensor(LUMA, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 * w).sum(dim=1, keepdim=True)


def resnet_stage(cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` torchvision BasicBlocks from ``cin`` to ``width`` channels, the first with ``stride`` (and a 1×1
    projection where the shape changes)."""
    layers = []
    for j in range(blocks):
        s = stride if j == 0 else 1
        down = None
        if s != 1 or cin != width:
            down = nn.Sequential(nn.Conv2d(cin, width, 1, stride=s, bias=False), nn.BatchNorm2d(width))
        layers.append(BasicBlock(cin, width, stride=s, downsample=down))
        cin = width
    return nn.Sequential(*layers)


class SmallResNet(nn.Module):
    """``forward(x01) -> logits``; ``features(x01)`` gives the pooled penultimate activations [B, widths[-1]]."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 widths: Sequence[int] = (16, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1, 1),
                 strides: Sequence[int] | None = None, dropout: float = 0.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels}: 1 (luminance) or 3 (RGB)")
        strides = list(strides) if strides is not None else [1] + [2] * (len(widths) - 1)
        if not widths or not len(widths) == len(blocks) == len(strides):
            raise ValueError(f"widths {list(widths)}, blocks {list(blocks)} and strides {strides} need the same, "
                             f"non-zero length")
        mean = list(mean) if mean is not None else [0.5] * in_channels
        std = list(std) if std is not None else [0.25] * in_channels
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean {mean} and std {std} need one value per input channel ({in_channels})")
        self.config = {"num_classes": int(num_classes), "in_channels": int(in_channels), "image_size": int(image_size),
                       "widths": list(widths), "blocks": list(blocks), "strides": strides, "dropout": float(dropout),
                       "mean": mean, "std": std}
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for w, n, s in zip(widths, blocks, strides):
            stages.append(resnet_stage(cin, w, n, s))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # start each residual branch at zero (torchvision's zero_init_residual)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → normalised [B, in_channels, S, S] at ``image_size`` S (luminance first when
        ``in_channels`` is 1: both steps are linear, so the order does not matter up to rounding)."""
        if x01.ndim != 4 or x01.shape[1] != 3:
            raise ClipdiffError(f"the judge takes images [B, 3, H, W] in [0, 1], got shape {list(x01.shape)}")
        x = x01.float()
        if self.in_channels == 1:
            x = luminance(x)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(self.prepare(x01))))

    def stage_features(self, x01: torch.Tensor) -> list[torch.Tensor]:
        """The average-pooled output of every stage, [B, widths[i]] each; the last is :meth:`features`."""
        h, out = self.stem(self.prepare(x01)), []
        for stage in self.stages:
            h = stage(h)
            out.append(self.pool(h))
        return out

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x01))
