"""The DDPM's denoiser: a diffusers ``UNet2DModel`` built from a plain config dict, and the export loader.

``load_ddpm`` needs neither Lightning nor the training code: the sampler, the guided sampler and the evaluator
call it on the ``export.pt`` that ``python -m clipdiff.train model=ddpm`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from clipdiff.errors import ClipdiffError
from clipdiff.models.export import load_export


def build_unet(config: Mapping[str, Any]) -> UNet2DModel:
    """``UNet2DModel(**config)`` with the mistakes a config can make reported as one ClipdiffError line."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}
    blocks = cfg.get("block_out_channels", (224, 448, 672, 896))
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and len(cfg[key]) != len(blocks):
            raise ClipdiffError(f"model.unet.{key} has {len(cfg[key])} entries but block_out_channels has {len(blocks)}")
    size = cfg.get("sample_size")
    if size is not None and size % 2 ** (len(blocks) - 1):
        raise ClipdiffError(f"model.unet.sample_size={size} must be divisible by 2^{len(blocks) - 1} "
                            f"({len(blocks)} resolution levels)")
    groups = cfg.get("norm_num_groups", 32)
    if any(c % groups for c in blocks):
        raise ClipdiffError(f"model.unet.block_out_channels={blocks} must be multiples of norm_num_groups={groups}")
    try:
        return UNet2DModel(**cfg)
    except (TypeError, ValueError) as e:
        raise ClipdiffError(f"model.unet: {e}") from None


def unet_config(unet: UNet2DModel) -> dict[str, Any]:
    """The public config of a built UNet (enough to rebuild it with :func:`build_unet`)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}


def load_ddpm(path: str | Path, key: str = "ddpm_ckpt", device: str | torch.device = "cpu",
              with_vocabulary: bool = False) -> tuple:
    """(UNet with the EMA weights, in eval mode; the noise schedule dict) from a ``kind="ddpm"`` export, and with
    ``with_vocabulary`` the caption vocabulary of a conditional DDPM (``model=ddpm_cond``; None: unconditional).

    A conditional UNet (``num_class_embeds``) samples unconditionally on its null id by default
    (:func:`clipdiff.diffusion.sampling.sample`), so code that expects an unconditional DDPM can load either.
    Build samplers from the schedule with :func:`clipdiff.diffusion.schedule.sampling_scheduler`.
    """
    obj = load_export(path, "ddpm", key=key)
    unet = build_unet(obj["unet_config"])
    unet.load_state_dict(obj["state_dict"])
    vocabulary = obj.get("vocabulary")
    classes = unet.config.num_class_embeds
    if classes and (not vocabulary or len(vocabulary) + 1 != classes or obj.get("null_id", classes - 1) != classes - 1):
        raise ClipdiffError(f"{key}={path}: a conditional DDPM ({classes} class embeddings) without a matching caption "
                            "vocabulary and null id: export it again with clipdiff.train model=ddpm_cond")
    unet = unet.to(device).eval().requires_grad_(False)
    if with_vocabulary:
        return unet, dict(obj["schedule"]), (list(vocabulary) if classes else None)
    return unet, dict(obj["schedule"])
