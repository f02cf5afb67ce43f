"""Train any model on the shared DataModule: ``python -m clipdiff.train model=clip|noisy_clip|ddpm|judge``.

``train(cfg)`` builds the DataModule, the LightningModule, callbacks, loggers and the Trainer from the composed
config, fits, exports a Lightning-free artefact (``export.pt``) from the best checkpoint, and returns
``(metrics, objects)``. The value of ``optimized_metric`` is returned to Hydra sweepers.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.cli import hydra_entry

log = logging.getLogger("clipdiff.train")

NOT_MODULE_ARGS = ("monitor",)  # model-group keys read by callbacks, not passed to the module


def build_model(model_cfg: DictConfig, datamodule) -> L.LightningModule:
    """Instantiate the model group; modules that take ``vocabulary`` get the DataModule's captions."""
    # resolve first: a detached copy could not follow interpolations into other groups (${data.image_size})
    resolved = OmegaConf.to_container(model_cfg, resolve=True)
    args = {k: v for k, v in resolved.items() if k not in NOT_MODULE_ARGS}
    cls = get_class(model_cfg._target_)
    extra: dict[str, Any] = {}
    if "vocabulary" in inspect.signature(cls.__init__).parameters:
        extra["vocabulary"] = datamodule.vocab.to_list()
    return instantiate(args, _convert_="all", **extra)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node, _convert_="all") for node in group.values() if node and "_target_" in node]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg.model, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not Path(ckpt_path).is_file():
        raise ClipdiffError(f"ckpt_path={ckpt_path} does not exist (give a checkpoint file, or 'last' to resume)")
    # our own checkpoints hold hyperparameters such as optimizer partials: trusted, so not weights-only
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and trainer.is_global_zero:
        model = type(model).load_from_checkpoint(best, map_location="cpu", weights_only=False)
    if cfg.get("test") and "test" in datamodule.splits:
        metrics.update({k: float(v) for k, v in trainer.test(model, datamodule=datamodule)[0].items()})
    if trainer.is_global_zero and hasattr(model, "export"):
        out = Path(cfg.paths.run_dir) / "export.pt"
        model.export(out)
        log.info("exported %s", out)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra_entry("train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
    log.info("final metrics (best checkpoint's epoch is exported): %s", shown)
    log.info("run directory: %s", cfg.paths.run_dir)
    key = cfg.get("optimized_metric")
    if key:
        if key not in metrics:
            raise ClipdiffError(f"optimized_metric={key} was not logged (logged: {', '.join(sorted(metrics))})")
        return metrics[key]
    return None


if __name__ == "__main__":
    main()
