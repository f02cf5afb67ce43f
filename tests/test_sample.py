"""``python -m clipdiff.sample`` end to end (subprocess), and FD/KID in a fixed feature space."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipdiff.eval.fid import FeatureSpace, RandomConvFeatures, fd_kid, random_features
from clipdiff.models.ddpm_module import DdpmModule
from clipdiff.models.export import save_export

REPO = Path(__file__).resolve().parents[1]
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon", "clip_sample": True}



@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = {"block_out_channels": [8, 8], "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "layers_per_block": 1}
    return DdpmModule(unet=unet, diffusion=LINEAR, image_size=8).export(tmp_path_factory.mktemp("ddpm") / "export.pt")


def start_sample(cwd: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m) go before the overrides
    cmd = [sys.executable, "-m", "clipdiff.sample", *flags, f"paths.log_dir={cwd}", "progress=false",
           *(o for o in overrides if o not in flags)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def cli_runs(tiny_export, tmp_path_factory) -> dict:
    """Three CLI runs (each pays ~5-10 s of imports): a good run and a wrong-kind run side by side, then a repeat
    of the good run, which must land in a new run directory."""
    tmp = tmp_path_factory.mktemp("sample_cli")
    wrong = save_export(tmp / "clip_export.pt", "clip", config={}, state_dict={})
    args = (f"ddpm_ckpt={tiny_export}", "guidance=none", "sampler=ddim", "sampler.steps=4", "num_samples=5",
            "batch_size=2", "seed=0")
    (tmp / "good").mkdir()
    (tmp / "bad").mkdir()
    first, bad = start_sample(tmp / "good", *args), start_sample(tmp / "bad", f"ddpm_ckpt={wrong}", "num_samples=2")
    res = {"root": tmp / "good", "wrong": wrong, "first": finish(first), "bad": finish(bad)}
    assert res["first"][0] == 0, res["first"][2][-2000:]
    runs = sorted((tmp / "good" / "sample" / "runs").iterdir())
    res["run1"] = runs[0]
    res["before"] = {p: p.read_bytes() for p in runs[0].rglob("*.png")}
    res["second"] = finish(start_sample(tmp / "good", *args))
    return res


@pytest.mark.xdist_group("sample_cli")  # one worker runs cli_runs for both tests (make test: --dist loadgroup)
def test_cli_writes_grid_and_pngs_into_new_run_dirs(cli_runs):
    _rc, out, _err = cli_runs["first"]
    run1 = cli_runs["run1"]
    assert f"samples: {run1}" in out
    pngs = sorted((run1 / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(pngs[0]).size == (8, 8) and Image.open(run1 / "grid.png").size[0] > 8
    assert (run1 / "sample.json").is_file()

    rc2, _, err2 = cli_runs["second"]
    assert rc2 == 0, err2[-2000:]
    runs = sorted((cli_runs["root"] / "sample" / "runs").iterdir())
    assert len(runs) == 2 and run1 in runs
    before = cli_runs["before"]
    assert {p: p.read_bytes() for p in run1.rglob("*.png")} == before  # the first run is untouched
    run2 = next(r for r in runs if r != run1)
    assert (run2 / "samples" / "000004.png").read_bytes() == before[run1 / "samples" / "000004.png"]  # same seed


@pytest.mark.xdist_group("sample_cli")
def test_cli_wrong_export_kind_is_one_line(cli_runs):
    rc, _, err = cli_runs["bad"]
    wrong = cli_runs["wrong"]
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines == [f"clipdiff: error: ddpm_ckpt={wrong} holds a clip model, but a ddpm model is needed here"]
    assert "Traceback" not in err


def test_fd_kid_separates_distributions():
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=gen) * 0.5
    same = torch.rand(64, 3, 16, 16, generator=gen) * 0.5
    other = torch.rand(64, 3, 16, 16, generator=gen) * 0.5 + 0.5
    space = random_features(dim=32)
    near, far = fd_kid(same, real, space, kid_subsets=10), fd_kid(other, real, space, kid_subsets=10)
    assert near["fd"] < far["fd"] and near["kid"] < far["kid"]
    assert near["n_fake"] == 64 and near["features"].startswith("random-conv")
    again = fd_kid(same, real, space, kid_subsets=10)
    assert again == near  # fixed features + seeded KID subsets: reproducible
    # batches of DataModule-style dicts and a plain module give the same numbers as tensors
    batched = fd_kid([{"image": b} for b in same.split(16)], real.split(20), FeatureSpace(RandomConvFeatures(32)),
                     kid_subsets=10)
    assert abs(batched["fd"] - near["fd"]) < 1e-6 * max(1.0, near["fd"])
