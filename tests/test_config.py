"""Every command's config composes from the real conf/ tree, with every choice of the main groups."""

from __future__ import annotations

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import clipdiff  # noqa: F401  (registers the resolvers the configs use, as every command does)


def composed(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("model", ["clip", "clip_vitb32", "noisy_clip", "ddpm", "ddpm_cond", "ddpm_64", "ddpm_cond_64", "ddpm_128",
                                   "judge"])
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


def test_training_without_a_logger_runs(flat_root, tmp_path):
    """``logger=none``: the default callbacks hold a learning-rate monitor, which Lightning refuses without a logger."""
    from conftest import compose_config

    from clipdiff.train import train

    cfg = compose_config("train", ["model=judge", f"data.root={flat_root}", "data.cache=false", "data.progress=false",
                                   "data.batch_size=4", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                                   "logger=none", f"paths.run_dir={tmp_path / 'run'}"])
    assert "lr_monitor" in cfg.callbacks
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and objects["trainer"].loggers == []
    assert (tmp_path / "run" / "export.pt").is_file()


def test_train_task_name_resolves_before_any_job_exists():
    """``hydra.sweep.dir`` is read by the launcher before a job's HydraConfig exists: the model choice must come
    from the composed config then (``python -m clipdiff.train -m …`` crashed on ``${hydra:runtime.choices.model}``)."""
    cfg = composed("train", ["model=ddpm"])  # with its hydra node, no HydraConfig set: the launcher's view
    assert cfg.hydra.sweep.dir.split("/")[-3] == "train_ddpm" and cfg.task_name == "train_ddpm"


def test_no_config_reads_hydra_runtime_values_where_hydra_resolves_them_before_a_job():
    """The same class of bug anywhere: ``${hydra:…}`` in task_name or hydra.sweep.* of any command's config."""
    from hydra.core.global_hydra import GlobalHydra

    for name in ["train", "sample", "evaluate", "label", "render", "pipeline", "aggregate"]:
        cfg = composed(name, [])
        GlobalHydra.instance().clear()
        read_early = OmegaConf.masked_copy(cfg, [k for k in ("task_name",) if k in cfg])
        assert "${hydra:" not in OmegaConf.to_yaml(cfg.hydra.sweep) + OmegaConf.to_yaml(read_early), name
        assert cfg.hydra.sweep.dir  # resolves with no HydraConfig set (subdir is per job: hydra.job.num)
