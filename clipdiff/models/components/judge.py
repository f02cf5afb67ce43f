"""The judge: an independent caption classifier that decides what an image (a sample) shows.

It is never used for guidance. Plain ``nn.Module`` parts, free of Lightning:

- :class:`Judge` — a compact ResNet (torchvision ``BasicBlock`` stages, 3×3 stride-1 stem, no max-pool) over the
  caption vocabulary. It takes images in [0, 1] of any size, resizes them to its training size and normalises
  them itself; ``predict`` gives caption ids, ``correct`` per-sample caption/colour/type hits.
- :func:`load_judge` — the classifier back from an ``export.pt`` (eval mode, ``vocabulary`` attached).
- :class:`JudgeAugment` — label-preserving training augmentation (crop/zoom/shift, mirror, optional blur and
  noise like DDPM samples; no colour changes: colour is the label).
- :func:`caption_parts` / :func:`accuracies_from_confusion` — colour and type read off caption ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from clipdiff.data.vocab import Vocabulary
from clipdiff.errors import ClipdiffError
from clipdiff.models.export import load_export


class Judge(nn.Module):
    """Compact ResNet caption classifier: ``forward(x01) -> logits`` over ``num_classes`` captions.

    A 3×3 stride-1 stem, then one stage of torchvision ``BasicBlock``s per entry of ``widths`` / ``blocks`` /
    ``strides`` (default strides 1, 2, 2, …), global average pooling, dropout and a linear head.
    """

    def __init__(self, num_classes: int, image_size: int = 32, widths: Sequence[int] = (32, 64, 128, 256),
                 blocks: Sequence[int] = (1, 1, 1, 1), strides: Sequence[int] | None = None, dropout: float = 0.0,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25)):
        super().__init__()
        strides = list(strides) if strides is not None else [1] + [2] * (len(widths) - 1)
        if not widths or not len(widths) == len(blocks) == len(strides):
            raise ValueError(f"judge widths {list(widths)}, blocks {list(blocks)} and strides {strides} need the "
                             f"same, non-zero length")
        self.config = {"num_classes": int(num_classes), "image_size": int(image_size), "widths": list(widths),
                       "blocks": list(blocks), "strides": strides, "dropout": float(dropout), "mean": list(mean), "std": list(std)}
        self.image_size = int(image_size)
        self.vocabulary: list[str] | None = None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for w, n, s in zip(widths, blocks, strides):
            layers = []
            for j in range(n):
                stride = s if j == 0 else 1
                down = None
                if stride != 1 or cin != w:
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(cin, w, stride=stride, downsample=down))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # start each residual branch at zero (torchvision's zero_init_residual)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → normalised [B, 3, S, S] at the training size S."""
        if x01.ndim != 4 or x01.shape[1] != 3:
            raise ClipdiffError(f"the judge takes images [B, 3, H, W] in [0, 1], got shape {list(x01.shape)}")
        x = x01.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(self.prepare(x01))))

    @torch.no_grad()
    def predict(self, x01: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Caption ids (int64 [B]) of the most likely caption, in chunks of ``batch_size``."""
        return torch.cat([self(chunk).argmax(dim=1) for chunk in x01.split(batch_size)])

    @torch.no_grad()
    def correct(self, x01: torch.Tensor, target: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per-sample hits (bool [B]) for ``caption``, ``colour`` and ``type`` against target caption ids."""
        if self.vocabulary is None:
            raise ClipdiffError("this judge has no vocabulary: load it with load_judge(export.pt)")
        pred = self.predict(x01, batch_size).cpu()
        target = torch.as_tensor(target).cpu().long().expand_as(pred)
        colour_of, type_of = caption_parts(self.vocabulary)
        return {"caption": pred == target, "colour": colour_of[pred] == colour_of[target],
                "type": type_of[pred] == type_of[target]}


def load_judge(path: str | Path, key: str = "judge_ckpt", map_location: str | torch.device = "cpu") -> Judge:
    """The judge of an ``export.pt`` (or a run directory holding one), in eval mode with ``vocabulary`` set.

    Any other file (missing, a Lightning checkpoint, another kind of model) fails with one ClipdiffError line
    naming ``key``.
    """
    obj = load_export(path, "judge", key=key)
    net = Judge(**obj["config"])
    net.load_state_dict(obj["state_dict"])
    net.vocabulary = list(obj["vocabulary"])
    if len(net.vocabulary) != net.config["num_classes"]:
        raise ClipdiffError(f"{key}={path}: the judge has {net.config['num_classes']} outputs but its vocabulary "
                            f"{len(net.vocabulary)} captions")
    return net.to(map_location).eval()


# -- colour / type parts of captions ----------------------------------------------------------------------------
def caption_parts(vocabulary: Sequence[str] | Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """For each caption id: the id of its colour part and of its body type (int64 [K] each)."""
    vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
    if list(vocabulary) != vocab.captions and not isinstance(vocabulary, Vocabulary):
        raise ClipdiffError("caption_parts needs the captions in id order (Vocabulary order: sorted, no repeats)")
    return (torch.tensor(vocab.colour_ids(), dtype=torch.long), torch.tensor(vocab.type_ids(), dtype=torch.long))


def accuracies_from_confusion(confusion: torch.Tensor, colour_of: torch.Tensor,
                              type_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracies from a caption confusion matrix (rows: true caption, columns: predicted caption).

    ``acc_caption`` (micro), ``acc_caption_macro`` (mean recall over the captions that occur — captions absent
    from the targets are left out rather than counted as 0), ``acc_colour`` and ``acc_type`` (the predicted
    caption's colour part / body type equals the true one's).
    """
    cm = confusion.double()
    total = cm.sum().clamp_min(1.0)
    support = cm.sum(dim=1)
    present = support > 0
    recall = cm.diagonal()[present] / support[present]
    colour_of, type_of = colour_of.to(cm.device), type_of.to(cm.device)
    same_colour = colour_of[:, None] == colour_of[None, :]
    same_type = type_of[:, None] == type_of[None, :]
    out = {
        "acc_caption": cm.diagonal().sum() / total,
        "acc_caption_macro": recall.mean() if recall.numel() else cm.new_zeros(()),
        "acc_colour": cm[same_colour].sum() / total,
        "acc_type": cm[same_type].sum() / total,
    }
    return {k: v.float() for k, v in out.items()}


# -- training augmentation --------------------------------------------------------------------------------------
def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-d Gaussian kernels [B, 2r+1]; sigma 0 gives the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


class JudgeAugment(nn.Module):
    """Label-preserving augmentation of a batch in [0, 1], one random draw per image, fully batched.

    - ``scale``: zoom range (side of the sampled window relative to the image; < 1 zooms in, a random resized
      crop of fixed aspect), ``translate``: shift range as a fraction of the image side, ``flip``: mirror left-right;
      one affine resample with edge-replicating borders.
    - ``blur_p`` / ``blur_sigma`` (pixels) and ``noise_p`` / ``noise_std``: Gaussian blur and additive Gaussian
      noise on a random share of the images, like the slightly soft, grainy samples of a small DDPM.
    Colour is never changed: it is half of the label.
    """

    def __init__(self, flip: bool = True, scale: Sequence[float] = (0.8, 1.0), translate: float = 0.08,
                 blur_p: float = 0.0, blur_sigma: Sequence[float] = (0.3, 1.0), noise_p: float = 0.0,
                 noise_std: Sequence[float] = (0.0, 0.05)):
        super().__init__()
        self.flip, self.scale, self.translate = bool(flip), tuple(scale), float(translate)
        self.blur_p, self.blur_sigma = float(blur_p), tuple(blur_sigma)
        self.noise_p, self.noise_std = float(noise_p), tuple(noise_std)

    def _uniform(self, n: int, lo_hi: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        lo, hi = lo_hi
        return torch.rand(n, device=like.device, dtype=like.dtype) * (hi - lo) + lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s = self._uniform(b, self.scale, x)
        sx = s * ((torch.rand(b, device=x.device) < 0.5).to(x.dtype) * -2 + 1) if self.flip else s
        t = self._uniform(2 * b, (-2 * self.translate, 2 * self.translate), x).view(b, 2)
        if self.scale != (1.0, 1.0) or self.translate > 0 or self.flip:
            theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
            theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = sx, s, t
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.blur_p > 0:
            sigma = self._uniform(b, self.blur_sigma, x) * (torch.rand(b, device=x.device) < self.blur_p)
            radius = max(1, round(2 * max(self.blur_sigma)))
            k = _gaussian_kernels(sigma, radius).repeat_interleave(x.shape[1], dim=0)  # [B*C, 2r+1]
            h, w = x.shape[-2:]
            y = F.pad(x.reshape(1, -1, h, w), (radius, radius, radius, radius), mode="replicate")
            y = F.conv2d(y, k[:, None, :, None], groups=k.shape[0])
            y = F.conv2d(y, k[:, None, None, :], groups=k.shape[0])
            x = y.view_as(x)
        if self.noise_p > 0:
            std = self._uniform(b, self.noise_std, x) * (torch.rand(b, device=x.device) < self.noise_p)
            x = x + std.view(b, 1, 1, 1) * torch.randn_like(x)
        return x.clamp(0.0, 1.0)
