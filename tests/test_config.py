"""Every command's config composes from the real conf/ tree, with every choice of the main groups."""

from __future__ import annotations

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf


def composed(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("model", ["clip", "clip_vitb32", "noisy_clip", "ddpm", "ddpm_64", "ddpm_128", "judge"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim"])
def test_train_composes(model: str, trainer: str):
    cfg = composed("train", [f"model={model}", f"trainer={trainer}", "logger=many"])
    assert cfg.model._target_.startswith("clipdiff.models.") and cfg.seed == 0
    assert cfg.callbacks.model_checkpoint.monitor == cfg.model.monitor.metric
    OmegaConf.to_container(cfg.model, resolve=True)  # every interpolation of the model group resolves


@pytest.mark.parametrize("name", ["sample", "evaluate", "label", "render", "pipeline"])
def test_other_commands_compose(name: str):
    cfg = composed(name, [])
    assert "seed" in cfg


def test_slurm_launcher_takes_gpus_and_nodes_from_the_trainer():
    cfg = composed("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                             "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 2)


def test_off_a_terminal_training_shows_a_line_based_progress_bar():
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from clipdiff.train import log_friendly_progress_bar

    added = log_friendly_progress_bar([], enabled=True, on_terminal=False)
    assert len(added) == 1 and isinstance(added[0], TQDMProgressBar)
    assert log_friendly_progress_bar([], enabled=True, on_terminal=True) == []
    assert log_friendly_progress_bar([], enabled=False, on_terminal=False) == []
    assert log_friendly_progress_bar([RichProgressBar()], enabled=True, on_terminal=False) == []
