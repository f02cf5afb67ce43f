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
from clipdiff.eval.real import judge_on_real, open_references
from clipdiff.eval.report import RESULT_COLUMNS, SUMMARY_COLUMNS, slug
from clipdiff.eval.stats import wilson
from clipdiff.models.export import save_export
from clipdiff.pipelines.guided import GuidedPipeline

CAPTIONS = ["a red car", "a green jeep/bus"]
# the tiny exports and the shared evaluation are made once: on one xdist worker for the whole module (loadgroup)
pytestmark = pytest.mark.xdist_group("test_evaluate")


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
        "cars_test": {"c1": "a red car", "c2": "a red car", "c3": "a green jeep/bus"},  # held out: real_split
    }, views=3)
    return {"root": root, "ddpm": ddpm_export(tmp / "ddpm.pt"), "clip": clip_export(tmp / "clip.pt"),
            "judge": judge_export(tmp / "judge.pt"), "noisy": noisy_clip_export(tmp / "noisy.pt"),
            "realism": realism_export(tmp / "realism.pt"), "tmp": tmp}


def realism_export(path: Path) -> Path:
    """An untrained tiny realism net: a fixed feature space for the realism columns."""
    from clipdiff.models.components.realism import RealismNet

    torch.manual_seed(0)
    net = RealismNet(image_size=8, widths=(4, 8), blocks=(1, 1), strides=(1, 2), stem_stride=1)
    return save_export(path, "realism", config=dict(net.config), state_dict=net.state_dict(), image_size=8)


def args(models, run_dir: Path, *extra: str) -> list[str]:
    return [f"ddpm_ckpt={models['ddpm']}", f"clip_ckpt={models['clip']}", f"noisy_clip_ckpt={models['noisy']}",
            f"judge_ckpt={models['judge']}", f"realism_ckpt={models['realism']}", f"data.root={models['root']}",
            "data.cache=false", "sampler.steps=4", "num_per_caption=3", "c2st.folds=2", "c2st.repeats=1",
            "controls.num=4", "progress=false", f"paths.run_dir={run_dir}", *extra]


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


def test_summary_has_realism_refusal_paired_differences_and_a_default(evaluation):
    """summary.csv's new columns: Wilson intervals of the pooled hits, realism in [0.5-ish, 1] for the two-sample
    tests and finite in the realism space, refusals, the paired difference against unguided (its sample-by-sample
    hit difference), is_default on at most one row per guided method and never on unguided."""
    run_dir = evaluation["run_dir"]
    summary = read_rows(run_dir / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS
    none = next(r for r in summary if r["method"] == "none")
    for r in summary:
        n = int(r["n"])
        _, lo, hi = wilson(round(float(r["acc_caption"]) * n), n)
        assert (float(r["acc_caption_lo"]), float(r["acc_caption_hi"])) == pytest.approx((lo, hi), abs=1e-5)
        assert 0.0 <= float(r["c2st_grey"]) <= 1.0 and 0.0 <= float(r["c2st_rgb"]) <= 1.0
        assert float(r["fd_indep"]) >= 0.0 and 0.0 <= float(r["precision"]) <= 1.0 and 0 <= float(r["refused"]) <= 1
        if r["method"] == "none":
            assert r["d_caption"] == "" and r["is_default"] == "False"
        else:
            assert float(r["d_caption"]) == pytest.approx(float(r["acc_caption"]) - float(none["acc_caption"]), abs=1e-5)
            assert float(r["d_caption_lo"]) <= float(r["d_caption"]) <= float(r["d_caption_hi"])
    for method in ("clip", "noisy_clip"):
        assert sum(r["is_default"] == "True" for r in summary if r["method"] == method) <= 1
    steps = read_rows(run_dir / "steps.csv")
    assert {(r["method"], float(r["scale"])) for r in steps} == {("clip", 4.0), ("noisy_clip", 1.0), ("noisy_clip", 4.0)}
    assert all(float(r["eps_shift_rms"]) > 0 for r in steps)  # scale 0 pushes nothing and logs no step
    controls = read_rows(run_dir / "controls.csv")
    assert [r["set"] for r in controls][:4] == ["held-out real", "flat silhouette", "noise inside car", "noise whole image"]
    assert controls[-1]["set"].startswith("over-guided (clip s=1000")
    for name in ("front.png", "eps_change.png", "types.csv", "grids/controls.png"):  # (3 test objects: no floor)
        assert (run_dir / name).is_file(), name


def test_report_grids_plot_samples_and_wandb_on_disk(evaluation):
    run_dir = evaluation["run_dir"]
    report = (run_dir / "report.md").read_text()
    assert "clip:" in report and "realism net" in report and "| noisy_clip | 4 |" in report
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
    for key in (b"eval/noisy_clip/s4/acc_caption", b"eval/noisy_clip/s4/c2st_grey", b"eval/judge_real", b"eval/steps"):
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


def test_judge_ceiling_on_held_out_real_images(evaluation, models, tmp_path):
    """judge_real.csv: the judge scored on held-out (test) images of each caption, spread over the objects, and the
    pooled row; a judge that always answers 'a red car' scores 1 on red cars and 0 on the jeep."""
    rows = read_rows(evaluation["run_dir"] / "judge_real.csv")
    assert [(r["caption"], r["n"], r["objects"]) for r in rows] == [
        ("a red car", "6", "2"), ("a green jeep/bus", "3", "1"), ("all", "9", "3")]
    assert all(r["split"].endswith("cars_test") for r in rows)
    assert "## The judge on held-out real renders" in (evaluation["run_dir"] / "report.md").read_text()

    from clipdiff.models.components.judge import load_judge

    judge = load_judge(models["judge"])
    with torch.no_grad():
        judge.colour_net.head[-1].bias.fill_(-1e4)[judge.colour_names.index("red")] = 1e4
        judge.type_net.head[-1].bias.fill_(-1e4)[judge.type_names.index("car")] = 1e4
        judge.threshold.fill_(-1e9)  # refuses nothing: the colour and type answers are all that count here
    _, real = open_references(compose_eval(args(models, tmp_path / "r")), 8)
    out = judge_on_real(judge, real, CAPTIONS, 3, 0)
    assert [(r["caption"], r["acc_caption"], r["acc_colour"]) for r in out] == [
        ("a red car", 1.0, 1.0), ("a green jeep/bus", 0.0, 0.0), ("all", 0.5, 0.5)]
    out = judge_on_real(judge, real, [*CAPTIONS, "a blue car"], 3, 0)  # no blue test car
    assert [(r["caption"], r["n"], r.get("acc_caption")) for r in out] == [
        ("a red car", 3, 1.0), ("a green jeep/bus", 3, 0.0), ("a blue car", 0, None), ("all", 6, 0.5)]
    assert out[-1]["acc_caption_lo"] < 0.5 < out[-1]["acc_caption_hi"]  # an interval over 3 objects, not 6 views


def test_missing_real_split_is_a_warning_not_an_error(models, tmp_path, caplog):
    cfg = compose_eval(args(models, tmp_path / "d", "data.splits.test=cars_nothing", 'captions=["a red car"]',
                            "methods=[none]", "wandb.enabled=false"))
    result = evaluate.run(cfg)
    assert result["ceiling"] == [] and not (tmp_path / "d" / "judge_real.csv").exists()
    assert "real_split=test: no split folder" in caplog.text


def test_options_and_guides_are_checked_before_the_first_sample(models, tmp_path, monkeypatch):
    """A bad option value, a missing or wrong guide export fail as one line before any method is sampled."""
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

    _, real = open_references(compose_eval(args(models, tmp_path / "o")), 8)
    out = judge_on_real(load_judge(models["judge"]), real, CAPTIONS, 1, 0)
    assert [(r["caption"], r["n"], r["objects"]) for r in out] == [
        ("a red car", 1, 1), ("a green jeep/bus", 1, 1), ("all", 2, 2)]
    out = judge_on_real(load_judge(models["judge"]), real, CAPTIONS, 6, 0)
    assert [(r["caption"], r["n"], r["objects"]) for r in out] == [
        ("a red car", 6, 2), ("a green jeep/bus", 3, 1), ("all", 9, 3)]


def test_cfg_rows_with_a_conditional_ddpm(models, tmp_path, monkeypatch):
    """methods cfg and cfg_noisy_clip (a conditional DDPM): rows at their own scales in results/summary/steps and the
    front plot, from the initial noise of the unguided row (cfg at w = 0 draws its images exactly); with an
    unconditional DDPM, asking for cfg is one line before anything is sampled."""
    from tiny_guides import cond_ddpm_export

    cond = cond_ddpm_export(models["tmp"] / "cond.pt")
    run_dir = tmp_path / "cfg"
    extra = ["methods=[none,cfg,cfg_noisy_clip]", "method_scales.cfg=[0.0,2.0]", "method_scales.cfg_noisy_clip=[4.0]",
             f"captions={CAPTIONS}".replace("'", '"'), "wandb.enabled=false", "controls.overguided_scale=0"]
    overrides = [a if not a.startswith("ddpm_ckpt=") else f"ddpm_ckpt={cond}" for a in args(models, run_dir, *extra)]
    result = evaluate.run(compose_eval(overrides))
    summary = read_rows(run_dir / "summary.csv")
    assert [(r["method"], float(r["scale"])) for r in summary] == [("none", 0.0), ("cfg", 0.0), ("cfg", 2.0),
                                                                  ("cfg_noisy_clip", 4.0)]
    rows = read_rows(run_dir / "results.csv")
    assert sorted((r["method"], float(r["scale"])) for r in rows) == sorted(
        (m, s) for m, s in [("none", 0.0), ("cfg", 0.0), ("cfg", 2.0), ("cfg_noisy_clip", 4.0)] for _ in CAPTIONS)
    assert all((r["guide_acc"] == "") == (r["method"] in ("none", "cfg")) for r in rows)  # cfg has no guide model
    steps = read_rows(run_dir / "steps.csv")
    assert {(r["method"], float(r["scale"])) for r in steps} >= {("cfg", 2.0), ("cfg_noisy_clip", 4.0)}
    assert all(float(r["eps_shift_rms"]) > 0 for r in steps if float(r["scale"]) > 0)
    samples = run_dir / "samples"

    def pngs(method, scale):
        return [np.asarray(Image.open(p)) for p in sorted((samples / method / scale).rglob("*.png"))]

    none, w0, w2 = pngs("none", "0"), pngs("cfg", "0"), pngs("cfg", "2")
    assert len(none) == 6 and all((a == b).all() for a, b in zip(none, w0))
    assert any((a != b).any() for a, b in zip(none, w2))
    assert (run_dir / "front.png").is_file() and "| cfg | 2 |" in result["report"].read_text()

    with pytest.raises(ClipdiffError, match=r"^method='cfg' needs a conditional DDPM .*: ddpm_ckpt is unconditional$"):
        monkeypatch.setattr(GuidedPipeline, "draw", lambda *a, **k: pytest.fail("sampled before the check"))
        evaluate.run(compose_eval(args(models, tmp_path / "u", "methods=[none,cfg]", "wandb.enabled=false")))
