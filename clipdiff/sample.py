"""Sample images from a trained DDPM: ``python -m clipdiff.sample ddpm_ckpt=RUN/export.pt sampler=ddim sampler.steps=50``.

Guided: ``… guidance=noisy_clip|clip guide_ckpt=GUIDE/export.pt prompt="a red car" guidance.scale=4``; with a
conditional DDPM (``model=ddpm_cond``) also ``guidance=cfg`` (no guide_ckpt) and ``guidance=cfg_noisy_clip``. A thin caller
of :class:`clipdiff.pipelines.guided.GuidedPipeline` (which loads and checks the exports; the guidance math is in
:mod:`clipdiff.diffusion.guidance`). Writes ``grid.png``, ``samples/NNNNNN.png`` and ``sample.json`` (what was run)
into this run's new directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.checks import count
from clipdiff.utils.cli import hydra_entry
from clipdiff.utils.io import atomic_open

log = logging.getLogger("clipdiff.sample")


def run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.run_dir)
    if (out_dir / "grid.png").exists():
        raise ClipdiffError(f"{out_dir} already holds samples; sampling writes into a new run directory")
    for key in ("num_samples", "batch_size", "sampler.steps", "grid_nrow"):
        count(OmegaConf.select(cfg, key), key)
    count(cfg.seed, "seed", minimum=None)
    # torch and the models load here, after the checks above, not at import: `--help`, `--cfg job` and a mistyped
    # number answer at once. The DDPM export is checked (missing, not an export, another kind of model) with torch
    # alone, before diffusers and open_clip load (seconds); the pipeline reads it again, from the page cache
    from clipdiff.models.export import load_export

    load_export(cfg.ddpm_ckpt, "ddpm", key="ddpm_ckpt")
    from clipdiff.diffusion.sampling import save_samples
    from clipdiff.pipelines.guided import GuidedPipeline

    guidance = instantiate(cfg.guidance) if cfg.get("guidance") else None  # guidance=none: an empty node
    sampler = instantiate(cfg.sampler).check()
    method = guidance.kind if guidance is not None else "none"
    prompt = cfg.get("prompt")
    if prompt is not None and guidance is None:
        log.warning("prompt=%r is ignored: unguided sampling (guidance=clip, noisy_clip, cfg or cfg_noisy_clip "
                    "steers)", prompt)
    if guidance is not None:
        guidance.check("guidance")
    kind = guidance.guide_kind if guidance is not None else None  # the guide model the method needs (cfg: none)
    if kind is None and cfg.get("guide_ckpt") and guidance is not None:
        log.warning("guide_ckpt is ignored: guidance=%s needs no guide model", method)
    pipe = GuidedPipeline.from_exports(cfg.ddpm_ckpt, {kind: cfg.guide_ckpt} if kind is not None else {},
                                       device=str(cfg.device), keys={kind: "guide_ckpt"} if kind else {})
    out = pipe(prompt if guidance is not None else None, guidance=guidance, num_samples=int(cfg.num_samples),
               sampler=sampler, seed=int(cfg.seed), batch_size=int(cfg.batch_size), progress=bool(cfg.progress))
    grid = save_samples(out.images, out_dir, nrow=int(cfg.grid_nrow))
    info = {"ddpm_ckpt": str(cfg.ddpm_ckpt), "guide_ckpt": cfg.guide_ckpt if kind is not None else None,
            **out.settings, "prompt": prompt, "num_samples": int(cfg.num_samples), "batch_size": int(cfg.batch_size),
            "seed": int(cfg.seed), "schedule": pipe.schedule, "grid": str(grid),
            "guide_acc": None if out.guide_logits is None else out.guide_correct().float().mean().item(),
            "guided_steps": out.guided_steps}
    with atomic_open(out_dir / "sample.json", "w") as f:
        json.dump(info, f, indent=2)
    return {"images": out.images, "grid": grid, "run_dir": out_dir, "output": out}


@hydra_entry("sample")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(f"samples: {result['run_dir']}")


if __name__ == "__main__":
    main()
