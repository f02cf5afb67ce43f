"""``python -m clipdiff.evaluate`` on tiny models: files, one row per method × caption × scale, shared noise, checks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from tiny_guides import clip_export, ddpm_export, judge_export, noisy_clip_export

from clipdiff import evaluate
from clipdiff.errors import ClipdiffError
from clipdiff.eval.report import RESULT_COLUMNS, bootstrap_ci, slug

CAPTIONS = ["a red car", "a green jeep/bus"]


def compose_eval(overrides: list[str]):
    return compose_config("evaluate", overrides)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import write_srn

    tmp = tmp_path_factory.mktemp("evaluate")
    root = write_srn(tmp / "flat", {
        "cars_train": {"a1": "a red car", "a2": "a red car", "a3": "a green jeep/bus", "a4": "a white car",
                       "a5": "a blue car", "a6": "a blue car"},
        "cars_val": {"b1": "a red car"},
        "cars_test": {"c1": "a red car", "c2": "a red car", "c3": "a green jeep/bus"},  # held out: judge_split
    }, views=3)
    return {"root": root, "ddpm": ddpm_export(tmp / "ddpm.pt"), "clip": clip_export(tmp / "clip.pt"),
            "judge": judge_export(tmp / "judge.pt"), "noisy": noisy_clip_export(tmp / "noisy.pt"), "tmp": tmp}


def args(models, run_dir: Path, *extra: str) -> list[str]:
    return [f"ddpm_ckpt={models['ddpm']}", f"clip_ckpt={models['clip']}", f"noisy_clip_ckpt={models['noisy']}",
            f"judge_ckpt={models['judge']}", f"data.root={models['root']}", "data.cache=false",
"sampler.steps=4", "num_per_caption=3",
            "progress=false", "bootstrap=200", f"paths.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def evaluation(models, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_run")
    cfg = compose_eval(args(models, run_dir, "scales=[1.0,4.0]", "method_scales.clip=[0.0,4.0]",
                            f"captions={CAPTIONS}".replace("'", '"'), "methods=[none,clip,noisy_clip]"))
    return evaluate.run(cfg)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_has_one_row_per_method_caption_scale(evaluation):
    run_dir = evaluation["run_dir"]
    rows = read_rows(run_dir / "results.csv")
    assert set(RESULT_COLUMNS) <= set(rows[0])
    keys = [(r["method"], r["caption"], float(r["scale"])) for r in rows]
    expected = [(m, c, s) for m, scales in (("none", [0.0]), ("clip", [0.0, 4.0]), ("noisy_clip", [1.0, 4.0]))
                for s in scales for c in CAPTIONS]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
    for r in rows:
        assert int(r["n"]) == 3
        for part in ("caption", "colour", "type"):
            lo, acc, hi = (float(r[f"acc_{part}{s}"]) for s in ("_lo", "", "_hi"))
            assert 0.0 <= lo <= acc <= hi <= 1.0
        assert float(r["fd"]) >= 0.0 and r["kid"] != ""  # real images of both captions exist
        assert (r["guide_acc"] == "") == (r["method"] == "none")


def test_report_grids_plot_samples_and_wandb_on_disk(evaluation):
    run_dir = evaluation["run_dir"]
    report = (run_dir / "report.md").read_text()
    assert "clip:" in report and "image tower" in report and "| noisy_clip | 4 |" in report
    assert (run_dir / "summary.csv").is_file() and (run_dir / "accuracy_vs_scale.png").stat().st_size > 5000
    for name in ("none_s0", "clip_s0", "clip_s4", "noisy_clip_s1", "noisy_clip_s4"):
        grid = Image.open(run_dir / "grids" / f"{name}.png")
        assert grid.size[1] >= 2 * 64  # a row per caption
        assert f"grids/{name}.png" in report
    folder = run_dir / "samples" / "noisy_clip" / "4" / slug("a green jeep/bus")
    assert folder.name == "a_green_jeep-bus"
    assert sorted(p.name for p in folder.glob("*.png")) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(folder / "0000.png").size == (8, 8)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "the wandb run is written (offline) into the run dir"
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # an offline run keeps its summary in this log
    for key in (b"eval/noisy_clip/s4/acc_caption", b"eval/real_test/acc_caption", b"eval/judge_real"):
        assert key in records, key


def test_same_noise_for_every_method(evaluation):
    """Scale 0 of a guided method reproduces the unguided samples exactly; a real scale changes them."""
    samples = evaluation["run_dir"] / "samples"

    def pngs(method, scale):
        return [np.asarray(Image.open(p)) for p in sorted((samples / method / scale).rglob("*.png"))]

    none, clip0, clip4 = pngs("none", "0"), pngs("clip", "0"), pngs("clip", "4")
    assert len(none) == 6 and all((a == b).all() for a, b in zip(none, clip0))
    assert any((a != b).any() for a, b in zip(none, clip4))


def test_captions_outside_the_judge_vocabulary_and_bad_methods_are_one_line(models, tmp_path):
    cfg = compose_eval(args(models, tmp_path / "a", 'captions=["a purple car"]', "methods=[none]"))
    with pytest.raises(ClipdiffError, match=r"not in the judge's vocabulary"):
        evaluate.run(cfg)
    cfg = compose_eval(args(models, tmp_path / "b", "methods=[none,glide]"))
    with pytest.raises(ClipdiffError, match=r"methods=\['none', 'glide'\]: choose from none, clip, noisy_clip"):
        evaluate.run(cfg)


def test_default_captions_are_the_most_frequent_training_labels(models, tmp_path):
    cfg = compose_eval(args(models, tmp_path / "c", "num_captions=2", "methods=[none]", "wandb.enabled=false"))
    result = evaluate.run(cfg)
    assert sorted(r["caption"] for r in result["rows"]) == ["a blue car", "a red car"]  # 2 objects each, others 1


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    small = torch.tensor([1, 0] * 5, dtype=torch.bool)
    big = torch.tensor([1, 0] * 500, dtype=torch.bool)
    m, lo, hi = bootstrap_ci(small, seed=0)
    m2, lo2, hi2 = bootstrap_ci(big, seed=0)
    assert m == m2 == 0.5 and lo < 0.5 < hi and hi2 - lo2 < (hi - lo) / 3
    assert bootstrap_ci(small, seed=0) == (m, lo, hi)
    # pooled over captions: each caption's samples are resampled on their own (all red right, all green wrong)
    assert bootstrap_ci(torch.tensor([1, 1, 1, 0, 0, 0]), seed=0, groups=2) == (0.5, 0.5, 0.5)


def test_judge_ceiling_on_held_out_real_images(evaluation, models, tmp_path):
    """judge_real.csv: the judge scored on num_per_caption held-out (test) images of each caption, and the pooled
    row; a judge that always answers 'a red car' scores 1 on red cars and 0 on the jeep, so the rows are per caption."""
    rows = read_rows(evaluation["run_dir"] / "judge_real.csv")
    assert [(r["caption"], r["split"], r["n"], r["objects"]) for r in rows] == [
        ("a red car", "test", "3", "2"), ("a green jeep/bus", "test", "3", "1"), ("all", "test", "6", "3")]
    assert "## The judge on held-out real images (`test`" in (evaluation["run_dir"] / "report.md").read_text()

    from clipdiff.models.components.judge import load_judge

    judge = load_judge(models["judge"])
    with torch.no_grad():
        judge.colour_net.head[-1].bias.fill_(-1e4)[judge.colour_names.index("red")] = 1e4
        judge.type_net.head[-1].bias.fill_(-1e4)[judge.type_names.index("car")] = 1e4
    real = evaluate.open_real(compose_eval(args(models, tmp_path / "r")), 8)
    out = evaluate.judge_on_real(judge, real, CAPTIONS, 3, "test", 200, 0)
    assert [(r["caption"], r["acc_caption"], r["acc_colour"]) for r in out] == [
        ("a red car", 1.0, 1.0), ("a green jeep/bus", 0.0, 0.0), ("all", 0.5, 0.5)]
    out = evaluate.judge_on_real(judge, real, [*CAPTIONS, "a blue car"], 3, "test", 200, 0)  # no blue test car
    assert [(r["caption"], r["n"], r.get("acc_caption")) for r in out] == [
        ("a red car", 3, 1.0), ("a green jeep/bus", 3, 0.0), ("a blue car", 0, None), ("all", 6, 0.5)]


def test_macro_bootstrap_weighs_each_stratum_the_same():
    from clipdiff.eval.report import macro_bootstrap_ci

    mean, lo, hi = macro_bootstrap_ci([np.ones(30), np.zeros(3)], resamples=500)
    assert mean == 0.5 and lo == hi == 0.5  # constant strata: no spread, and 30 vs 3 images weigh the same
    mean, lo, hi = macro_bootstrap_ci([np.r_[np.ones(10), np.zeros(10)], np.ones(5)], resamples=2000, seed=1)
    assert mean == 0.75 and lo < 0.75 < hi and 0.6 < lo and hi < 0.9


def test_missing_judge_split_is_a_warning_not_an_error(models, tmp_path, caplog):
    cfg = compose_eval(args(models, tmp_path / "d", "data.splits.test=cars_nothing", 'captions=["a red car"]',
                            "methods=[none]", "wandb.enabled=false"))
    result = evaluate.run(cfg)
    assert result["ceiling"] == [] and not (tmp_path / "d" / "judge_real.csv").exists()
    assert "judge_split=test: no split folder" in caplog.text and "judge_split=null silences this" in caplog.text


def test_options_and_guides_are_checked_before_the_first_sample(models, tmp_path, monkeypatch):
    """A bad option value, a missing or wrong guide export fail as one line before any method is sampled."""
    from clipdiff.pipelines.guided import GuidedPipeline

    def draw(*_a, **_k):
        raise AssertionError("sampled before every part was checked")

    monkeypatch.setattr(GuidedPipeline, "draw", draw)
    cases = [("guides.noisy_clip.form=logprob", r"^guides\.noisy_clip\.form='logprob': choose classifier or dot$"),
             ("guides.clip.window=[0.5,0.2]", r"^guides\.clip\.window=\[0\.5, 0\.2\]: give \[start, stop\]"),
             ("method_scales.noisy_clip=[-1]", r"^guides\.noisy_clip\.scale=-1\.0 must be a finite number ≥ 0$"),
             ("noisy_clip_ckpt=null", r"^noisy_clip_ckpt is not set"),
             (f"noisy_clip_ckpt={models['clip']}", r"^noisy_clip_ckpt=.*clip.pt holds a clip model, but a noisy_clip")]
    for i, (override, msg) in enumerate(cases):
        cfg = compose_eval(args(models, tmp_path / str(i), override, 'captions=["a red car"]', "wandb.enabled=false"))
        with pytest.raises(ClipdiffError, match=msg):
            evaluate.run(cfg)
        assert not (tmp_path / str(i) / "samples").exists()


def test_judge_real_counts_the_objects_it_scored(models, tmp_path):
    """One image of each caption is one object scored, though the split holds two red cars."""
    from clipdiff.models.components.judge import load_judge

    real = evaluate.open_real(compose_eval(args(models, tmp_path / "o")), 8)
    out = evaluate.judge_on_real(load_judge(models["judge"]), real, CAPTIONS, 1, "test", 50, 0)
    assert [(r["caption"], r["n"], r["objects"]) for r in out] == [
        ("a red car", 1, 1), ("a green jeep/bus", 1, 1), ("all", 2, 2)]
    out = evaluate.judge_on_real(load_judge(models["judge"]), real, CAPTIONS, 6, "test", 50, 0)
    assert [(r["caption"], r["n"], r["objects"]) for r in out] == [
        ("a red car", 6, 2), ("a green jeep/bus", 3, 1), ("all", 9, 3)]
