"""Nothing lost, nothing silent: commands run as a user runs them, on a tiny dataset. A non-finite loss stops a run
with one line; a used run directory is never trained over; bad numbers, missing or unwritable files and a foreign
checkpoint each give one ``clipdiff: error:`` line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_srn

TESTS = Path(__file__).resolve().parent

TINY_DDPM = [
    "model=ddpm", "data.image_size=16", "data.batch_size=4", "data.eval_batch_size=6", "data.cache=false",
    "data.progress=false", "model.unet.block_out_channels=[8,16]",
    "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]", "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]",
    "model.unet.norm_num_groups=4", "model.sample_every_n_epochs=null", "trainer.enable_progress_bar=false",
    "logger=csv",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    table = {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car"}
    return write_srn(tmp_path_factory.mktemp("nsl") / "flat",
                     {"cars_train": table, "cars_val": {"b1": "a red car"}, "cars_test": {"c1": "a blue car"}})


def run(command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", f"clipdiff.{command}", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The command failed with exit status 2 and exactly one ``clipdiff: error:`` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("clipdiff: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_non_finite_loss_stops_training_at_that_step(root, tmp_path):
    out = tmp_path / "nan"
    proc = run("train", *TINY_DDPM, f"data.root={root}", f"hydra.run.dir={out}", "model.optimizer.lr=1e6",
               "trainer.max_steps=20", "callbacks.step_checkpoint.every_n_train_steps=1")
    line = one_error_line(proc)
    assert "at step" in line and "model.optimizer.lr" in line and "1e+06" in line, line
    assert not (out / "export.pt").exists()
    for ckpt in (out / "checkpoints").glob("*.ckpt"):  # whatever was written holds finite numbers only
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt
