"""The main job end to end on a tiny procedural set: every stage runs as its documented command, the report and
results land in the run directory, and a second invocation reuses every finished stage."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "stages.render.args.num_objects=16", "stages.render.args.views_per_object=3", "stages.render.args.image_size=32",
    "data.image_size=32", "train_logger=csv",
    "+stages.label.args.views=3",
    "+stages.clip.args.trainer.max_steps=2", "+stages.clip.args.data.batch_size=8",
    "+stages.noisy_clip.args.trainer.max_steps=2", "+stages.noisy_clip.args.data.batch_size=8",
    "+stages.ddpm.args.trainer.max_steps=2", "+stages.ddpm.args.data.batch_size=8",
    "+stages.judge.args.trainer.max_steps=2", "+stages.judge.args.data.batch_size=8",
    "+stages.evaluate.args.sampler.steps=2", "stages.evaluate.args.num_per_caption=2",
    "+stages.evaluate.args.num_captions=2", "+stages.evaluate.args.bootstrap=20", "+stages.evaluate.args.num_real=8",
    "+stages.evaluate.args.progress=false", "+stages.evaluate.args.wandb.enabled=false",
]


def run_pipeline(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPDIFF_ROOT": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "clipdiff.pipeline", *TINY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_pipeline_end_to_end_and_reuse(tmp_path: Path):
    first = run_pipeline(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = tmp_path / "outputs" / "latest_demo"
    assert latest.is_symlink() and (latest / "contact_sheet.png").is_file()
    for stage in ("clip", "noisy_clip", "ddpm", "judge"):
        assert (tmp_path / "outputs" / "demo" / stage / "export.pt").is_file(), stage
    evaluation = tmp_path / "outputs" / "demo" / "evaluate"
    rows = list(csv.DictReader((evaluation / "results.csv").open()))
    assert {r["method"] for r in rows} == {"none", "clip", "noisy_clip"}
    assert all(r["n"] == "2" for r in rows) and (evaluation / "report.md").is_file()
    report = (latest / "report.md").read_text()
    assert "| evaluate |" in report and "evaluate/" in report  # stage table + the evaluation, links rebased
    first_run = os.readlink(latest)

    second = run_pipeline(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert all(f"[{s}] reused" in log for s in ("render", "label", "clip", "noisy_clip", "ddpm", "judge", "evaluate"))
    assert os.readlink(latest) != first_run  # a new run directory, the old one untouched
    assert Path(first_run, "report.md").is_file()
