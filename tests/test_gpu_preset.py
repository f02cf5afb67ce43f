"""``python -m clipdiff.pipeline preset=gpu``: the whole job at 64 px on a GPU. Its composition (every stage's command
as the pipeline would run it, composed by that command's own config), the pipeline's ``trainer=`` reaching every
training stage, and a run end to end on this CPU with tiny overrides (``trainer=cpu``)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image
from test_pipeline import TINY

import clipdiff  # noqa: F401  (registers the resolvers the configs use)
from clipdiff.pipeline import stage_args, trainer_args

REPO = Path(__file__).resolve().parents[1]
TRAINING = ("ddpm", "clip", "noisy_clip", "judge", "realism")


def composed(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


def stage_config(pipeline, stage: str):
    """The config the stage's command composes from the arguments the pipeline gives it."""
    args = [*(trainer_args(pipeline) if pipeline.stages[stage].command == "train" else []),
            *stage_args(pipeline.stages[stage])]
    return composed(pipeline.stages[stage].command, args)


def test_the_gpu_preset_runs_every_stage_at_64px_on_the_gpu_in_bf16():
    cfg = composed("pipeline", ["preset=gpu"])
    assert cfg.workdir.endswith("outputs/gpu") and cfg.data.image_size == 64
    for stage in TRAINING:
        train = stage_config(cfg, stage)
        assert train.trainer.accelerator == "gpu" and train.trainer.precision == "bf16-mixed", stage
        assert train.data.image_size == 64 and train.data.root == cfg.data.root, stage
    ddpm = stage_config(cfg, "ddpm")
    assert ddpm.model._target_.endswith("CondDdpmModule") and ddpm.model.image_size == 64  # the 64 px UNet, cfg-able
    assert list(ddpm.model.unet.block_out_channels) == list(composed("train", ["model=ddpm_64"]).model.unet
                                                             .block_out_channels)
    assert stage_config(cfg, "clip").model.model_name == "clipdiff-vitb-64"  # ViT-B/32's size, reading 64 px
    evaluate = stage_config(cfg, "evaluate")
    assert evaluate.data.image_size == 64 and evaluate.batch_size == 256 and evaluate.device == "auto"
    assert evaluate.ddpm_ckpt.startswith(cfg.workdir)


def test_the_presets_documented_local_weights_overrides_compose(tmp_path: Path):
    weights = tmp_path / "open_clip_pytorch_model.bin"
    clip_args = (f"+stages.clip.args={{model: clip_vitb32, model.model_name: ViT-B-32, model.pretrained: {weights}, "
                 "model.optimizer.lr: 1.0e-5}")
    noisy_args = ("+stages.noisy_clip.args={model.init_from: null, model.model_name: clipdiff-vitb-64, "
                  "model.freeze_text: false}")
    cfg = composed("pipeline", ["preset=gpu", clip_args, noisy_args])
    clip, noisy = stage_config(cfg, "clip"), stage_config(cfg, "noisy_clip")
    assert clip.model.model_name == "ViT-B-32" and clip.model.pretrained == str(weights)
    assert clip.model.optimizer.lr == 1.0e-5
    assert noisy.model.init_from is None and noisy.model.model_name == "clipdiff-vitb-64" and not noisy.model.freeze_text


def test_the_pipelines_trainer_reaches_every_training_stage_and_only_them():
    cfg = composed("pipeline", ["preset=gpu", "trainer=ddp", "trainer.devices=4"])
    for stage in TRAINING:
        train = stage_config(cfg, stage)
        assert train.trainer.strategy == "ddp" and train.trainer.devices == 4, stage
    assert not any(a.startswith("trainer") for a in stage_args(cfg.stages.evaluate))
    # the demo passes no trainer (each command's default, the CPU): its commands are what they were
    demo = composed("pipeline", [])
    assert trainer_args(demo) == [] and stage_config(demo, "ddpm").trainer.accelerator == "cpu"
    assert OmegaConf.select(demo, "trainer") is None
    on_gpu = composed("pipeline", ["trainer=gpu"])
    assert stage_config(on_gpu, "clip").trainer.accelerator == "gpu"


def preset_tiny() -> list[str]:
    """The pipeline tests' tiny overrides, less what would undo the preset's 64 px, plus the CPU."""
    keep = [a for a in TINY if not a.startswith("data.image_size") and not a.endswith("image_size=32")
            and "num_workers" not in a and "label.args.workers" not in a]
    return ["preset=gpu", "trainer=cpu", "jobs=2", "loader_workers=0", *keep,
            "stages.render.args.image_size=64", "stages.heldout.args.image_size=64", "stages.render.args.num_workers=1",
            "stages.heldout.args.num_workers=1", "stages.label.args.workers=1"]


@pytest.mark.slow
def test_the_gpu_preset_runs_end_to_end_on_a_cpu_with_tiny_overrides(tmp_path: Path):
    env = {**os.environ, "CLIPDIFF_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    run = subprocess.run([sys.executable, "-m", "clipdiff.pipeline", *preset_tiny()], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    work = tmp_path / "outputs" / "gpu"
    for stage in TRAINING:  # every training stage ran the pipeline's trainer, then its own overrides
        assert "trainer=cpu" in (work / f"{stage}.log").read_text().splitlines()[0] or \
            "trainer=cpu" in (work / stage / "stage.json").read_text(), stage
    rows = list(csv.DictReader((work / "evaluate" / "results.csv").open()))
    assert {r["method"] for r in rows} == {"none", "clip", "noisy_clip", "cfg"}
    samples = sorted((work / "evaluate" / "samples").rglob("*.png"))
    assert samples and all(Image.open(p).size == (64, 64) for p in samples[:8])
