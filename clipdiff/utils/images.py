"""Image grids and labelled contact sheets (PIL and numpy; torch tensors too, without importing torch)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipdiff.utils.io import atomic_open

if TYPE_CHECKING:
    import torch

# torch is not imported here: the labeller and the reports draw sheets from numpy arrays, and a command that never
# makes a tensor should not pay torch's import (seconds) for them


def float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 → float32 in [0, 1] (a new tensor, on the same device); float input is returned as is."""
    import torch

    if images.dtype != torch.uint8:
        return images
    return images.to(torch.float32).mul_(1 / 255)


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N,3,H,W] tensor (floats in [0,1] or uint8) or uint8 NHWC array → uint8 NHWC."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            images = images.detach().float().clamp(0, 1).mul(255).round().byte()
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    return np.asarray(images, dtype=np.uint8)


def grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> Image.Image:
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return Image.fromarray(canvas)


def labelled_rows(rows: Sequence[tuple[str, np.ndarray]], cell: int, label_width: int = 150, pad: int = 2) -> Image.Image:
    """One row per (label, uint8 NHWC images); rows may hold different numbers of images."""
    ncol = max((len(imgs) for _, imgs in rows), default=1)
    cell_h = cell + pad
    canvas = Image.new("RGB", (label_width + ncol * (cell + pad) + pad, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * cell_h
        draw.text((4, y + cell // 2 - 6), label, fill=(0, 0, 0), font=font)
        for c, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((cell, cell), Image.Resampling.BICUBIC)
            canvas.paste(tile, (label_width + pad + c * (cell + pad), y))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return path


def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Lay out, write atomically as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    return path
