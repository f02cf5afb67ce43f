"""Label car folders automatically: ``python -m clipdiff.label data.root=DIR split=cars_train|all``.

Writes ``DIR/cars_text/<split>.tsv`` (object_id, caption, confidence, …) from the images alone (see
:mod:`clipdiff.labeling`), refusing to replace an existing file unless ``overwrite=true``. When ``DIR`` holds
the procedural set's ``ground_truth.tsv``, prints an agreement report and writes it into the run directory.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, ListConfig, OmegaConf

from clipdiff.labeling.dataset import LabelResult, label_dataset
from clipdiff.utils.cli import hydra_entry, run_dir

log = logging.getLogger("clipdiff.label")


def label(cfg: DictConfig) -> LabelResult:
    split = cfg.split
    if isinstance(split, ListConfig):
        split = [str(s) for s in OmegaConf.to_container(split)]
    kwargs = {
        "root": cfg.data.root, "split": split, "views": cfg.views, "vocabulary": cfg.vocabulary,
        "overrides": cfg.overrides, "out_dir": cfg.out_dir, "overwrite": bool(cfg.overwrite),
        "workers": int(cfg.workers), "progress": bool(cfg.progress), "run_dir": run_dir(),
        "sheet": int(cfg.contact_sheet), "report": bool(cfg.report),
    }
    result = label_dataset(body_model=cfg.body_model, clip_ckpt=cfg.get("clip_ckpt"), device=cfg.get("device", "cpu"),
                           **kwargs)
    for split_name, path in result.files.items():
        n = sum(1 for r in result.rows if r.split == split_name)
        flagged = sum(1 for r in result.rows if r.split == split_name and r.analysis.flags)
        line = f"{path}: {n} objects labelled" + (f", {flagged} flagged" if flagged else "")
        if split_name in result.backups:
            line += f" (old file kept as {result.backups[split_name].name})"
        print(line)
    print(f"{len(result.rows)} objects in {result.seconds:.1f} s ({result.objects_per_second:.1f} objects/s)")
    if result.contact_sheet:
        print(f"least confident objects: {result.contact_sheet}")
    if result.agreement is not None:
        from clipdiff.labeling.report import render_text

        print(render_text(result.agreement))
        log.info("%s", result.agreement.summary())
        if result.report_files:
            print(f"agreement report: {result.report_files[0].parent}")
    return result


@hydra_entry("label")
def main(cfg: DictConfig) -> None:
    label(cfg)


if __name__ == "__main__":
    main()
