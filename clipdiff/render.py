"""Render the built-in procedural car set (SRN ShapeNet-cars layout + ground truth).

    python -m clipdiff.render out_dir=DIR num_objects=600 views_per_object=24 image_size=128 seed=0 \
        [splits.cars_val=0.1 …] [caption_temperature=1.0] [num_workers=2]

A complete render with the same config in ``out_dir`` is reused; a different one is refused (exit 2).
See :mod:`clipdiff.data.procedural` and ``conf/render.yaml``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from clipdiff.data.procedural import render_dataset
from clipdiff.data.procedural.generate import RenderResult
from clipdiff.utils.cli import hydra_entry


def render(cfg: DictConfig) -> RenderResult:
    splits = OmegaConf.to_container(cfg.splits, resolve=True) if cfg.splits is not None else None
    result = render_dataset(
        out_dir=cfg.out_dir,
        num_objects=cfg.num_objects,
        views_per_object=cfg.views_per_object,
        image_size=cfg.image_size,
        seed=cfg.seed,
        splits=splits,
        caption_temperature=cfg.caption_temperature,
        num_workers=cfg.num_workers,
        supersample=cfg.supersample,
        progress=cfg.progress,
    )
    counts = ", ".join(f"{k} {v}" for k, v in result.split_counts.items())
    if result.reused:
        print(f"{result.out_dir}: a complete render with this config is already there ({counts}); reusing it")
    else:
        print(
            f"{result.out_dir}: rendered {result.num_objects} objects ({counts}), {result.num_images} new images "
            f"in {result.seconds:.1f} s ({result.images_per_second:.0f} images/s)"
        )
    return result


@hydra_entry("render")
def main(cfg: DictConfig) -> None:
    render(cfg)


if __name__ == "__main__":
    main()
