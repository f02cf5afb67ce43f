"""Train any model on the shared DataModule: ``python -m clipdiff.train model=clip|noisy_clip|ddpm|judge``.

``train(cfg)`` builds the DataModule, the LightningModule, callbacks, loggers and the Trainer from the composed
config, fits, exports a Lightning-free artefact (``export.pt``) from the best checkpoint, and returns
``(metrics, objects)``. The value of ``optimized_metric`` is returned to Hydra sweepers.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.checks import check_call_args
from clipdiff.utils.cli import hydra_entry
from clipdiff.utils.io import check_writable

if TYPE_CHECKING:
    import lightning as L

# Lightning, torch and the models are imported where they are used, so that `--help` and `--cfg job` answer at once.
log = logging.getLogger("clipdiff.train")


def uses_captions(model_cfg: DictConfig) -> bool:
    """Whether the model group's module reads captions: it takes ``vocabulary`` (CLIP, noisy CLIP, judge, the
    conditional DDPM). The others (the unconditional DDPM, the realism net) train without a label file."""
    from hydra.utils import get_class

    return "vocabulary" in inspect.signature(get_class(model_cfg._target_).__init__).parameters


def build_model(model_cfg: DictConfig, datamodule) -> L.LightningModule:
    """Instantiate the model group; modules that take ``vocabulary`` get the DataModule's captions."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    # resolve first: a detached copy could not follow interpolations into other groups (${data.image_size})
    args = OmegaConf.to_container(model_cfg, resolve=True)
    check_call_args(args, "model")
    extra: dict[str, Any] = {}
    if uses_captions(model_cfg):
        extra["vocabulary"] = datamodule.vocab.to_list()
    try:
        return instantiate(args, _convert_="all", **extra)
    except InstantiationException as e:  # the module's own one-line error, not Hydra's wrapper around it
        if isinstance(e.__cause__, ClipdiffError):
            raise e.__cause__ from None
        raise


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


def resumes_in(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether this run continues the run in ``run_dir`` itself: ``ckpt_path=last``/``hpc``, a checkpoint inside it,
    or a SLURM ``hpc_ckpt_*.ckpt`` there (which Lightning resumes from by itself)."""
    if ckpt_path in ("last", "hpc") or any(run_dir.glob("hpc_ckpt_*.ckpt")):
        return True
    resolved = resolve_ckpt_path(ckpt_path)
    return bool(resolved) and run_dir.resolve() in Path(resolved).resolve().parents


def claim_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse to train into a directory that holds an earlier run's files (checkpoints, export, logs, samples),
    unless this run resumes that one, or ``overwrite=true``: then each of them is kept as ``<name>.bak-<time>``.
    Hydra's ``.hydra/`` (the earlier one is kept as ``.hydra.bak-<time>``: ``KeepEarlierConfig``) and log file
    are not counted: Hydra writes them before any command starts."""
    if not run_dir.is_dir():
        return
    used = sorted(p.name for p in run_dir.iterdir() if p.name != ".hydra" and not p.name.endswith(".log")
                  and ".bak-" not in p.name and not (p.is_dir() and not any(p.iterdir())))
    if not used or resumes_in(run_dir, ckpt_path):
        return
    if not overwrite:
        raise ClipdiffError(
            f"hydra.run.dir={run_dir} already holds a run ({', '.join(used[:5])}{', …' * (len(used) > 5)}): train "
            "into a new directory (leave hydra.run.dir out), continue that run with ckpt_path=last, or add "
            "overwrite=true (its files are then kept as <name>.bak-<time>)")
    stamp = f"{datetime.now():%Y%m%d-%H%M%S-%f}"  # never the name of an earlier backup
    for name in used:
        os.replace(run_dir / name, run_dir / f"{name}.bak-{stamp}")
    log.warning("overwrite=true: the earlier run's %s in %s are kept as <name>.bak-%s", ", ".join(used), run_dir, stamp)


def training_state(path: str) -> dict[str, Any]:
    """The ``state_dict`` of the training checkpoint at ``path``; an unreadable file or an export is one line. Read
    memory-mapped with torch alone: nothing but the key names and shapes is loaded, and no model library."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same mistake)
        raise ClipdiffError(f"ckpt_path={path} is not a readable checkpoint ({type(e).__name__}): give a .ckpt "
                            "written by clipdiff.train, or its run directory") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if state is None or "loops" not in ckpt:
        raise ClipdiffError(f"ckpt_path={path} is not a training checkpoint (an export.pt is for sampling and "
                            "model.init_from): give a .ckpt written by clipdiff.train, or its run directory")
    return state


def check_checkpoint_fits(path: str, model: L.LightningModule) -> None:
    """A resume from a checkpoint of another model (or of other model settings) is one line, not Lightning's
    state-dict error listing every key."""
    state = training_state(path)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unknown = [k for k in state if k not in want]
    reshaped = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unknown or reshaped:
        config = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
        where = f" ({config} has them)" if config.is_file() else ""
        raise ClipdiffError(
            f"ckpt_path={path} holds another model's weights ({len(missing)} of this model's missing, {len(unknown)} "
            f"unknown, {len(reshaped)} of another shape; e.g. {(missing + unknown + reshaped)[0]}): resume with the "
            f"model=… and model.* settings it was trained with{where}")


def checkpoint_folders(callbacks: DictConfig | None, run_dir: Path) -> list[Path]:
    """Where the run writes: its directory (``export.pt``) and each callback's checkpoint folder (``dirpath``)."""
    folders = [run_dir, *(Path(str(node.dirpath)) for node in (callbacks or {}).values()
                          if node and node.get("dirpath"))]
    return list(dict.fromkeys(folders))


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
    if not uses_captions(cfg.model):
        datamodule.without_captions()  # a root without cars_text is fine for a model that reads no captions
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg.model, datamodule)
    # a checkpoint of another model is refused before the callbacks, loggers (a wandb run) and the Trainer start
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    if ckpt_path not in (None, "last", "hpc"):
        check_checkpoint_fits(ckpt_path, model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks += log_friendly_progress_bar(callbacks, cfg.trainer.get("enable_progress_bar", True), sys.stdout.isatty())
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = without_logger_only_callbacks(callbacks, loggers)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

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
    # a used run directory, a missing data root, a missing or unreadable checkpoint (or an export given as one), an
    # unwritable checkpoint folder and a non-number in the model's settings are refused before Lightning and the
    # model's libraries are imported and the data is read (~10 s of start-up for a one-line answer); the
    # checkpoint is read with torch alone, the optimizer's numbers too
    from clipdiff.data.srn import check_root

    run_dir = Path(cfg.paths.run_dir)
    claim_run_dir(run_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite")))
    check_root(cfg.data.root)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    if ckpt_path not in (None, "last", "hpc"):
        training_state(ckpt_path)
    for folder in checkpoint_folders(cfg.get("callbacks"), run_dir):
        check_writable(folder)
    check_call_args(OmegaConf.to_container(cfg.model, resolve=True), "model")

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from clipdiff.utils import resume

    try:
        metrics, _ = train(cfg)
    except SIGTERMException:
        signum = resume.stop_signal or signal.SIGTERM
        log.warning("stopped by %s; continue with: python -m clipdiff.train … ckpt_path=%s",
                    signal.Signals(signum).name, cfg.paths.run_dir)
        sys.exit(128 + signum)
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
