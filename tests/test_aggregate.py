"""``python -m clipdiff.aggregate``: a sweep directory → one table with the overrides as columns and the
accuracy-vs-FD plot; on a synthetic evaluate sweep, real sweeps run from the README in test_readme_commands.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_config
from hydra.core.hydra_config import HydraConfig

from clipdiff.aggregate import run
from clipdiff.errors import ClipdiffError
from clipdiff.eval.report import SUMMARY_COLUMNS, write_csv


def fake_job(sweep: Path, num: int, overrides: list[str], summary: list[dict] | None = None) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        write_csv(summary, SUMMARY_COLUMNS, job / "summary.csv")
    return job


def summary_row(method: str, scale: float, acc: float, fd: float) -> dict:
    return {"method": method, "scale": scale, "n": 16, "acc_caption": acc, "acc_caption_lo": acc - 0.1,
            "acc_caption_hi": acc + 0.1, "fd": fd, "kid": 0.01, "guide_acc": 0.9, "sec_per_image": 0.5}


def read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_sweep_becomes_one_table_and_a_plot(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00-000000"
    for num, (form, scale) in enumerate([("logprob", 4), ("logprob", 16), ("dot", 4), ("dot", 16)]):
        fake_job(sweep, num, [f"guides.noisy_clip.form={form}", f"scales=[{scale}]", "num_per_caption=16"],
                 [summary_row("none", 0.0, 0.1, 30.0), summary_row("noisy_clip", scale, 0.2 + scale / 40, 30.0 + scale)])
    fake_job(sweep, 4, ["guides.noisy_clip.form=broken", "scales=[4]"])  # a failed job: no results
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    out = tmp_path / "agg"
    result = run(compose_config("aggregate", [f"sweep_dir={sweep}", f"paths.run_dir={out}"]))
    rows = read(out / "aggregate.csv")
    assert len(rows) == 9  # 4 jobs × (none + noisy_clip) + the failed job
    assert list(rows[0])[:3] == ["guides.noisy_clip.form", "scales", "num_per_caption"]
    guided = [r for r in rows if r["method"] == "noisy_clip"]
    assert [(r["guides.noisy_clip.form"], r["scales"], r["scale"], r["acc_caption"]) for r in guided] == [
        ("logprob", "[4]", "4", "0.3"), ("logprob", "[16]", "16", "0.6"), ("dot", "[4]", "4", "0.3"),
        ("dot", "[16]", "16", "0.6")]
    assert rows[-1]["job"] == "4" and rows[-1]["status"].startswith("no results")
    md = (out / "aggregate.md").read_text()
    assert "| guides.noisy_clip.form | scales |" in md and "![accuracy vs FD](accuracy_vs_fd.png)" in md
    assert result["plot"] == out / "accuracy_vs_fd.png" and result["plot"].stat().st_size > 5000


def test_not_a_sweep_is_one_clear_error(tmp_path):
    with pytest.raises(ClipdiffError, match="does not exist"):
        run(compose_config("aggregate", [f"sweep_dir={tmp_path / 'nothing'}", f"paths.run_dir={tmp_path / 'a'}"]))
    (tmp_path / "single_run" / ".hydra").mkdir(parents=True)  # a plain run directory, not a multirun
    with pytest.raises(ClipdiffError, match=r"is not a Hydra multirun directory \(no <n>/.hydra/overrides.yaml\)"):
        run(compose_config("aggregate", [f"sweep_dir={tmp_path / 'single_run'}", f"paths.run_dir={tmp_path / 'b'}"]))


def test_optuna_search_composes():
    cfg = compose_config("train", ["hparams_search=clip_optuna"])
    sweeper = HydraConfig.get().sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert set(sweeper.params) == {"model.optimizer.lr", "model.optimizer.weight_decay", "data.batch_size",
                                   "model.label_aware"}
    assert cfg.optimized_metric == "val/acc_caption" == cfg.model.monitor.metric
    assert HydraConfig.get().mode.name == "MULTIRUN"


def test_command_line_error_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "clipdiff.aggregate", f"sweep_dir={tmp_path}/none",
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"clipdiff: error: sweep_dir={tmp_path}/none does not exist (give outputs/<task>/multiruns/<timestamp>)"]


def test_seed_sweep_of_the_pipeline_gives_mean_and_spread(tmp_path):
    """``spread_over=seed`` over pipeline jobs (their summary under evaluate/): mean and sample std per method ×
    scale against numbers computed here, and the default rows grouped however their scale varies."""
    import statistics

    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00-000000"
    accs = {0: (0.1, 0.5, 0.7), 1: (0.2, 0.6, 0.5), 2: (0.15, 0.4, 0.9)}  # none, noisy s10, noisy s30
    for seed, (a0, a10, a30) in accs.items():
        job = fake_job(sweep, seed, [f"seed={seed}"])
        rows = [summary_row("none", 0.0, a0, 30.0), summary_row("noisy_clip", 10.0, a10, 31.0),
                summary_row("noisy_clip", 30.0, a30, 40.0 + seed)]
        default = 1 if a10 >= a30 else 2  # the more accurate one is this seed's default
        for i, r in enumerate(rows):
            r["is_default"] = i == default
            r["c2st_grey"] = 0.6 + 0.01 * seed
        write_csv(rows, SUMMARY_COLUMNS, job / "evaluate" / "summary.csv")
    out = tmp_path / "agg"
    result = run(compose_config("aggregate", [f"sweep_dir={sweep}", "spread_over=seed", f"paths.run_dir={out}"]))
    assert {r["kind"] for r in result["rows"]} == {"pipeline"}
    spread = {(r["method"], r["scale"]): r for r in result["spread_rows"]}
    s10 = spread[("noisy_clip", 10.0)]
    assert s10["jobs"] == 3 and s10["seed"] == "0 1 2"
    assert s10["acc_caption_mean"] == pytest.approx(statistics.fmean([0.5, 0.6, 0.4]))
    assert s10["acc_caption_std"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.4]))
    assert spread[("noisy_clip", 30.0)]["fd_min"] == 40.0 and spread[("noisy_clip", 30.0)]["fd_max"] == 42.0
    default = spread[("noisy_clip (default)", "30 10 30")]  # seed 1 chose scale 10, seeds 0 and 2 scale 30
    assert default["acc_caption_mean"] == pytest.approx(statistics.fmean([0.7, 0.6, 0.9]))
    md = (out / "spread.md").read_text()
    assert "mean ± sample std over seed" in md and f"{statistics.fmean([0.5, 0.6, 0.4]):.3f} ± " in md
    with pytest.raises(ClipdiffError, match="spread_over=lr: the sweep's jobs do not vary it"):
        run(compose_config("aggregate", [f"sweep_dir={sweep}", "spread_over=lr", f"paths.run_dir={tmp_path / 'x'}"]))
