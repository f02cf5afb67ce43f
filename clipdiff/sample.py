"""Sample images from a trained DDPM: ``python -m clipdiff.sample ddpm_ckpt=RUN/export.pt sampler=ddim sampler.steps=50``.

Guided: ``… guidance=noisy_clip|clip guide_ckpt=GUIDE/export.pt prompt="a red car" guidance.scale=4`` (the guides and
their checks are in :mod:`clipdiff.diffusion.guidance`).

Writes ``grid.png``, ``samples/NNNNNN.png`` and ``sample.json`` (what was run) into this run's new directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from clipdiff.diffusion.guidance import instantiate_guidance
from clipdiff.diffusion.sampling import CondFn, sample, save_samples
from clipdiff.diffusion.schedule import sampling_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import load_ddpm
from clipdiff.utils.checks import count
from clipdiff.utils.cli import hydra_entry
from clipdiff.utils.io import atomic_open

log = logging.getLogger("clipdiff.sample")

SAMPLER_ONLY = ("name", "steps", "eta")  # sampler keys that are loop arguments, not scheduler settings


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ClipdiffError(f"device={name} but no CUDA device is available (use device=cpu)")
    return torch.device(name)


def build_guidance(cfg: DictConfig, schedule: dict, num_samples: int, device: torch.device, *,
                   targets: str | list[str] | None = None, scheduler: Any = None, unet: Any = None,
                   image_size: int | None = None) -> CondFn | None:
    """The guidance config's factory called with the DDPM's schedule, the sampler, the UNet and the targets
    (one prompt or one caption per sample); None for ``guidance=none``."""
    if cfg is None or "_target_" not in cfg:
        if cfg is not None and cfg.get("name", "none") != "none":
            raise ClipdiffError(f"guidance={cfg.name} has no _target_ (a factory returning a cond_fn)")
        return None
    return instantiate_guidance(cfg, schedule=schedule, num_samples=num_samples, device=device, targets=targets,
                                scheduler=scheduler, unet=unet, image_size=image_size)


def run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.run_dir)
    if (out_dir / "grid.png").exists():
        raise ClipdiffError(f"{out_dir} already holds samples; sampling writes into a new run directory")
    for key in ("num_samples", "batch_size", "sampler.steps", "grid_nrow"):
        count(OmegaConf.select(cfg, key), key)
    count(cfg.seed, "seed", minimum=None)
    device = pick_device(str(cfg.device))
    unet, schedule = load_ddpm(cfg.ddpm_ckpt, key="ddpm_ckpt", device=device)
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if k not in SAMPLER_ONLY}
    scheduler = sampling_scheduler(schedule, cfg.sampler.name, **overrides)
    prompt = cfg.get("prompt")
    if prompt is not None and cfg.get("guidance", {}).get("_target_") is None:
        log.warning("prompt=%r is ignored: unguided sampling (guidance=clip or guidance=noisy_clip steers)", prompt)
    cond_fn = build_guidance(cfg.get("guidance"), schedule, cfg.num_samples, device, targets=prompt,
                             scheduler=scheduler, unet=unet, image_size=int(unet.config.sample_size))
    images = sample(unet, scheduler, cfg.num_samples, generator=torch.Generator().manual_seed(int(cfg.seed)),
                    steps=int(cfg.sampler.steps), batch_size=int(cfg.batch_size), cond_fn=cond_fn,
                    eta=float(cfg.sampler.get("eta", 0.0)), progress=bool(cfg.progress))
    grid = save_samples(images, out_dir, nrow=int(cfg.grid_nrow))
    info = {"ddpm_ckpt": str(cfg.ddpm_ckpt), "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
            "guidance": OmegaConf.to_container(cfg.guidance, resolve=True) if cfg.get("guidance") else None,
            "prompt": prompt,
            "num_samples": int(cfg.num_samples), "batch_size": int(cfg.batch_size), "seed": int(cfg.seed),
            "schedule": schedule, "grid": str(grid)}
    with atomic_open(out_dir / "sample.json", "w") as f:
        json.dump(info, f, indent=2)
    return {"images": images, "grid": grid, "run_dir": out_dir}


@hydra_entry("sample")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(f"samples: {result['run_dir']}")


if __name__ == "__main__":
    main()
