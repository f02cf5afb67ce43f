"""Train any model on the shared DataModule: ``python -m clipdiff.train model=clip|noisy_clip|ddpm|judge``.

``train(cfg)`` builds the DataModule, the LightningModule, callbacks, loggers and the Trainer from the composed
config, fits, exports a Lightning-free artefact (``export.pt``) from the best checkpoint, and returns
``(metrics, objects)``. The value of ``optimized_metric`` is returned to Hydra sweepers.
"""

from __future__ import annotations

import inspect
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.cli import hydra_entry

if TYPE_CHECKING:
    import lightning as L

# Lightning, torch and the models are imported where they are used, so that `--help` and `--cfg job` answer at once.
log = logging.getLogger("clipdiff.train")

NOT_MODULE_ARGS = ("monitor",)  # model-group keys read by callbacks, not passed to the module


def build_model(model_cfg: DictConfig, datamodule) -> L.LightningModule:
    """Instantiate the model group; modules that take ``vocabulary`` get the DataModule's captions."""
    from hydra.utils import get_class, instantiate

    # resolve first: a detached copy could not follow interpolations into other groups (${data.image_size})
    resolved = OmegaConf.to_container(model_cfg, resolve=True)
    args = {k: v for k, v in resolved.items() if k not in NOT_MODULE_ARGS}
    cls = get_class(model_cfg._target_)
    extra: dict[str, Any] = {}
    if "vocabulary" in inspect.signature(cls.__init__).parameters:
        extra["vocabulary"] = datamodule.vocab.to_list()
    return instantiate(args, _convert_="all", **extra)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    if not group:
        return []
    return [instantiate(node, _convert_="all") for node in group.values() if node and "_target_" in node]


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A checkpoint file; a run directory (its ``checkpoints/last.ckpt``: continue that run in a new directory);
    or Lightning's ``last`` (the newest ``last*.ckpt`` of *this* run directory: a requeued SLURM job), ``hpc``."""
    if not ckpt_path or ckpt_path in ("last", "hpc"):
        return ckpt_path
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ClipdiffError(f"ckpt_path={ckpt_path} is a directory without checkpoints/last.ckpt "
                                "(give a training run directory or a .ckpt file)")
    elif not path.is_file():
        raise ClipdiffError(f"ckpt_path={ckpt_path} does not exist (give a checkpoint file or a training run "
                            "directory to resume)")
    return str(path)


def log_friendly_progress_bar(callbacks: list, enabled: bool, on_terminal: bool) -> list:
    """Off a terminal (a pipeline stage, a SLURM log) Lightning's rich bar prints nothing until an epoch ends,
    while tqdm's redraws are lines: a tqdm bar then, unless there is no bar or the callbacks hold one."""
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    if on_terminal or not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [TQDMProgressBar(refresh_rate=10)]


def without_logger_only_callbacks(callbacks: list, loggers: list) -> list:
    """``logger=none``: Lightning's LearningRateMonitor refuses to run without a logger, so it is left out."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if loggers:
        return callbacks
    dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
    if dropped:
        log.info("no logger: the learning-rate monitor is off")
    return [c for c in callbacks if c not in dropped]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg.model, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks += log_friendly_progress_bar(callbacks, cfg.trainer.get("enable_progress_bar", True), sys.stdout.isatty())
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = without_logger_only_callbacks(callbacks, loggers)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
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


def finish_wandb_run() -> None:
    """Close this job's wandb run: Lightning's WandbLogger leaves it open, and the next job of a multirun (same
    process) would otherwise log into it instead of starting its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@hydra_entry("train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        metrics, _ = train(cfg)
    except SIGTERMException:
        log.warning("stopped by SIGTERM; continue with: python -m clipdiff.train … ckpt_path=%s", cfg.paths.run_dir)
        sys.exit(128 + signal.SIGTERM)
    finally:
        finish_wandb_run()
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
