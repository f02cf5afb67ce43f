"""The main job end to end on a tiny procedural set: every stage runs as its documented command, the report and
results land in the run directory, and a second invocation reuses every finished stage."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "stages.render.args.num_objects=16", "stages.render.args.views_per_object=3", "stages.render.args.image_size=32",
    "data.image_size=32", "train_logger=csv",
    # one thread per stage, as every process of the suite (tests/conftest.py): label and evaluate take all CPUs in
    # the demo, where they run alone; here the other xdist workers share the CPUs, and a 2-thread stage waits
    "threads=1", "stages.label.threads=1", "stages.evaluate.threads=1",
    "+stages.render.args.num_workers=1", "+stages.label.args.workers=1",  # 48 images: no pool of spawned workers
    "+stages.label.args.views=3",
    "+stages.clip.args.trainer.max_steps=2", "+stages.clip.args.data.batch_size=8",
    "+stages.noisy_clip.args.trainer.max_steps=2", "+stages.noisy_clip.args.data.batch_size=8",
    "+stages.ddpm.args.trainer.max_steps=2", "+stages.ddpm.args.data.batch_size=4",  # 4 distinct captions
    "+stages.judge.args.trainer.max_steps=2", "+stages.judge.args.data.batch_size=8",
    "+stages.evaluate.args.sampler.steps=2", "stages.evaluate.args.num_per_caption=2",
    "+stages.realism.args.trainer.max_steps=2", "+stages.realism.args.data.batch_size=8",
    "stages.heldout.args.num_objects=12", "stages.heldout.args.views_per_object=2", "stages.heldout.args.image_size=32",
    "+stages.evaluate.args.num_captions=2", "+stages.evaluate.args.num_real=8", "stages.evaluate.args.scales=[4]",
    "stages.evaluate.args.method_scales.cfg=[2]",
    "+stages.evaluate.args.c2st.folds=2", "+stages.evaluate.args.c2st.repeats=1", "+stages.evaluate.args.controls.num=2",
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
    assert {r["method"] for r in rows} == {"none", "clip", "noisy_clip", "cfg"}  # the conditional DDPM serves all
    assert all(r["n"] == "2" for r in rows) and (evaluation / "report.md").is_file()
    report = (latest / "report.md").read_text()
    assert "| evaluate |" in report and "evaluate/" in report  # stage table + the evaluation, links rebased
    first_run = os.readlink(latest)
    # the DDPM trains beside the CLIP chain (jobs=2), each stage's full output is in <workdir>/<stage>.log
    marks = {s: json.loads((tmp_path / "outputs" / "demo" / s / "stage.json").read_text()) for s in ("ddpm", "clip")}
    assert marks["ddpm"]["started"] < marks["clip"]["finished"] and marks["clip"]["started"] < marks["ddpm"]["finished"]
    assert "[ddpm]" in first.stdout and (tmp_path / "outputs" / "demo" / "ddpm.log").stat().st_size > 0

    second = run_pipeline(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert all(f"[{s}] reused" in log for s in ("render", "label", "clip", "noisy_clip", "ddpm", "judge", "evaluate"))
    assert os.readlink(latest) != first_run  # a new run directory, the old one untouched
    assert Path(first_run, "report.md").is_file()


def pipeline_cfg(stages: dict, **top):
    from omegaconf import OmegaConf

    return OmegaConf.create({"jobs": 2, "threads": "auto", **top, "stages": stages})


def test_stage_dependencies_default_to_the_previous_stage_and_are_checked():
    from clipdiff.errors import ClipdiffError
    from clipdiff.pipeline import dependencies, run_stages, stage_threads

    cfg = pipeline_cfg({"a": {"command": "render", "after": []}, "b": {"command": "label"},
                        "c": {"command": "train", "after": ["a"], "threads": 3}})
    assert dependencies(cfg, list(cfg.stages)) == {"a": [], "b": ["a"], "c": ["a"]}
    assert stage_threads(cfg.stages.c, cfg) == 3
    assert stage_threads(cfg.stages.b, cfg) == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(ClipdiffError, match="unknown stage"):
        dependencies(pipeline_cfg({"a": {"command": "render", "after": ["z"]}}), ["a"])
    with pytest.raises(ClipdiffError, match="threads='many'"):
        stage_threads(cfg.stages.a, pipeline_cfg({}, threads="many"))
    cycle = pipeline_cfg({"a": {"command": "data_report", "after": ["b"]}, "b": {"command": "data_report", "after": ["a"]}})
    with pytest.raises(ClipdiffError, match="cycle"):
        run_stages(cycle, ["a", "b"], Path("."), on_ready=lambda name: None)


def test_in_process_stages_run_in_dependency_order():
    from clipdiff.pipeline import run_stages

    cfg = pipeline_cfg({"late": {"command": "data_report", "after": ["early"]},
                        "early": {"command": "data_report", "after": []}})
    order = []
    run_stages(cfg, ["late", "early"], Path("."), on_ready=order.append)
    assert order == ["early", "late"]


def test_a_stage_whose_input_was_rebuilt_runs_again(tmp_path: Path, monkeypatch, caplog):
    """Reuse is keyed by a stage's arguments *and* its inputs' runs: rebuilding a stage (``rerun=[a]``, or new
    arguments) reruns everything after it, on this invocation and on later ones; the rest is reused."""
    import logging

    from clipdiff import pipeline

    monkeypatch.setattr(pipeline, "stage_command", lambda stage, stage_dir, args=None: [sys.executable, "-c", "pass"])
    stages = {"a": {"command": "train", "after": [], "args": {"x": 1}},
              "report": {"command": "data_report", "after": ["a"]},
              "b": {"command": "train", "after": ["report"], "args": {"y": 1}},
              "c": {"command": "train", "after": ["b"]}, "side": {"command": "train", "after": []}}

    def ran(**top) -> set[str]:
        records = pipeline.run_stages(pipeline_cfg(stages, **top), list(stages), tmp_path, on_ready=lambda n: None)
        return {r["stage"] for r in records if not r["reused"]}

    with caplog.at_level(logging.INFO, logger="clipdiff.pipeline"):
        assert ran() == {"a", "b", "c", "side"}
        assert ran() == set()
        assert ran(rerun=["a"]) == {"a", "b", "c"}  # b is after a through the in-process report stage
        stages["b"]["args"]["y"] = 2
        assert ran() == {"b", "c"}
        assert ran(rerun="all") == {"a", "b", "c", "side"}
    kept = sorted(p.name.split(".")[0] for p in tmp_path.glob("*.replaced-*"))
    assert kept == ["a", "a", "b", "b", "b", "c", "c", "c", "side"]  # every replaced run kept, none overwritten
    assert "[c] runs again: input(s) b rebuilt since" in caplog.text
    assert "[b] runs again: its arguments changed" in caplog.text
    marker = json.loads((tmp_path / "c" / "stage.json").read_text())
    assert marker["inputs"] == {"b": json.loads((tmp_path / "b" / "stage.json").read_text())["finished"]}


def test_only_refuses_a_stage_whose_inputs_are_neither_chosen_nor_finished(tmp_path: Path):
    from clipdiff.errors import ClipdiffError
    from clipdiff.pipeline import check_selection_inputs

    cfg = pipeline_cfg({"render": {"command": "render", "after": []}, "label": {"command": "label"},
                        "data": {"command": "data_report", "after": ["label"]},
                        "clip": {"command": "train", "after": ["data"]}})
    with pytest.raises(ClipdiffError, match=r"stage 'data' needs \['label'\].*only=\[render,label,data\]"):
        check_selection_inputs(cfg, ["render", "data"], tmp_path)
    with pytest.raises(ClipdiffError, match=r"stage 'clip' needs \['label'\]"):  # through the in-process report
        check_selection_inputs(cfg, ["clip"], tmp_path)
    check_selection_inputs(cfg, ["render", "label", "data"], tmp_path)
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "stage.json").write_text('{"finished": 1.0}')  # label finished in an earlier run
    check_selection_inputs(cfg, ["render", "data"], tmp_path)
    check_selection_inputs(cfg, ["clip"], tmp_path)


def test_a_partial_run_leaves_latest_demo_alone(tmp_path: Path):
    """``only=`` (the conf's own example) on a new dataset: refused in one line before anything runs; a partial run
    that can run does, and does not repoint ``outputs/latest_demo`` (eval.readme and make bench read it)."""
    env = {**os.environ, "CLIPDIFF_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(REPO)}
    tiny = ["stages.render.args.num_objects=4", "stages.render.args.views_per_object=1",
            "stages.render.args.image_size=32"]

    def pipeline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clipdiff.pipeline", *tiny, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600, check=False)

    refused = pipeline("only=[render,data]")
    assert refused.returncode == 2 and not (tmp_path / "outputs" / "data" / "procedural").exists()
    assert refused.stderr.strip().splitlines() == [
        (f"clipdiff: error: only=['render', 'data']: stage 'data' needs ['label'], which has not finished in "
        f"{tmp_path}/outputs/demo; add it: only=[render,label,data]")]
    done = pipeline("only=[render]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "outputs" / "demo" / "render" / "stage.json").is_file()
    assert not (tmp_path / "outputs" / "latest_demo").exists() and "latest_demo not moved" in done.stdout


def test_unknown_stage_names_in_only_or_rerun_are_one_line():
    from clipdiff.errors import ClipdiffError
    from clipdiff.pipeline import stage_selection

    cfg = pipeline_cfg({"render": {"command": "render"}, "label": {"command": "label"}}, only=["render", "lable"])
    with pytest.raises(ClipdiffError, match=r"only=\['lable', 'render'\] names unknown stage\(s\) \['lable'\]"):
        stage_selection(cfg, "only")
    assert stage_selection(pipeline_cfg(cfg.stages, rerun="all"), "rerun") == {"render", "label"}


def test_a_failing_stage_stops_the_others_with_one_line(tmp_path: Path, monkeypatch):
    """A stage that fails ends the run with one line naming it and its log; a stage running beside it is stopped
    (SIGTERM, so a training stage checkpoints) instead of running on."""
    import time

    from clipdiff import pipeline
    from clipdiff.errors import ClipdiffError

    survived = tmp_path / "slow_survived"
    programs = {"bad": "import sys, time; time.sleep(1); sys.exit(3)",
                "slow": f"import time; time.sleep(5); open({str(survived)!r}, 'w')"}
    monkeypatch.setattr(pipeline, "stage_command",
                        lambda stage, stage_dir, args=None: [sys.executable, "-c", programs[stage_dir.name]])
    stages = {"slow": {"command": "train", "after": []}, "bad": {"command": "train", "after": []}}
    t0 = time.time()
    with pytest.raises(ClipdiffError) as err:
        pipeline.run_stages(pipeline_cfg(stages), list(stages), tmp_path, on_ready=lambda n: None)
    assert time.time() - t0 < 30  # the slow stage was not waited for
    time.sleep(6)
    assert not survived.exists()  # … it was stopped
    assert str(err.value).startswith(f"stage 'bad' failed (exit 3; its log: {tmp_path / 'bad.log'})")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "slow" / "stage.json").exists() and not (tmp_path / "bad" / "stage.json").exists()
@pytest.mark.slow
def test_a_stopped_pipeline_saves_its_training_stages_and_the_same_command_resumes(tmp_path: Path):
    """``kill -TERM <pipeline>`` while the DDPM trains: the pipeline passes it on, the DDPM writes last.ckpt, the
    pipeline says how to continue and exits 143; the same command then reuses render and label and resumes the DDPM
    from that step to its end."""
    import signal
    import time

    import torch

    args = ["stages.render.args.num_objects=16", "stages.render.args.views_per_object=3",
            "stages.render.args.image_size=32", "data.image_size=32", "train_logger=csv", "+stages.label.args.views=3",
            "threads=1", "stages.label.threads=1", "+stages.render.args.num_workers=1", "+stages.label.args.workers=1",
            "+stages.ddpm.args.trainer.max_steps=6", "+stages.ddpm.args.data.batch_size=4",
            "+stages.ddpm.args.callbacks.step_checkpoint._target_=scaleout_helpers.HoldingStepCheckpoint",
            "only=[render,label,ddpm]"]
    marker = tmp_path / "held"
    env = {**os.environ, "CLIPDIFF_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    held = {**env, "CLIPDIFF_TEST_HOLD_STEP": "3", "CLIPDIFF_TEST_HOLD_MARKER": str(marker)}
    cmd = [sys.executable, "-m", "clipdiff.pipeline", *args]
    first = subprocess.Popen(cmd, cwd=REPO, env=held, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out and "the same command continues" in out, out[-3000:]
    ddpm = tmp_path / "outputs" / "demo" / "ddpm"
    assert torch.load(ddpm / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    assert not (ddpm / "stage.json").exists()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "[render] reused" in log and "[label] reused" in log and f"ckpt_path={ddpm / 'checkpoints' / 'last.ckpt'}" in log
    assert json.loads((ddpm / "stage.json").read_text())["args"]  # finished
    assert torch.load(ddpm / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
    # it went on from step 3 in the same directory: Lightning restored the checkpoint, nothing was set aside
    assert "Restored all states from the checkpoint" in (ddpm.parent / "ddpm.log").read_text()
    assert not list(ddpm.parent.glob("ddpm.replaced-*"))


def test_ctrl_c_is_passed_on_to_the_running_stages(tmp_path: Path, monkeypatch, caplog):
    """SIGINT to the pipeline: each running stage gets SIGTERM and is waited for; then one line says how to continue
    and the pipeline exits 130."""
    import logging
    import signal
    import threading
    import time

    from clipdiff import pipeline

    script = ("import pathlib, signal, sys, time\n"
              "def stop(s, f):\n    pathlib.Path(sys.argv[1]).write_text('saved'); sys.exit(143)\n"
              "signal.signal(signal.SIGTERM, stop)\npathlib.Path(sys.argv[2]).write_text('ready')\ntime.sleep(120)\n")
    monkeypatch.setattr(pipeline, "stage_command", lambda stage, stage_dir, args=None: [
        sys.executable, "-c", script, str(stage_dir.parent / f"{stage_dir.name}.saved"),
        str(stage_dir.parent / f"{stage_dir.name}.ready")])
    stages = {"a": {"command": "train", "after": []}, "b": {"command": "train", "after": []},
              "c": {"command": "train", "after": ["a"]}}

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"{s}.ready").exists() for s in "ab") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background (CI), else Python's
    threading.Thread(target=interrupt, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="clipdiff.pipeline"), pytest.raises(SystemExit) as stopped:
        pipeline.run_stages(pipeline_cfg(stages), list(stages), tmp_path, on_ready=lambda n: None)
    assert stopped.value.code == 128 + signal.SIGINT
    assert (tmp_path / "a.saved").read_text() == "saved" and (tmp_path / "b.saved").read_text() == "saved"
    assert not (tmp_path / "c.ready").exists()  # nothing new starts once stopped
    assert "stopped by SIGINT" in caplog.text and "the same command continues" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before  # the pipeline's handlers are gone


def test_the_data_report_is_reused_while_its_inputs_are_the_same(flat_root, tmp_path, monkeypatch, caplog):
    """The data report (made in the pipeline's own process, in ``<workdir>/data``) lands in every run directory; it
    is made again only when the run of the stage it reads (the labels), the data settings or the seed changed, or
    when ``rerun`` names it."""
    import logging

    from conftest import compose_config
    from omegaconf import open_dict

    from clipdiff import pipeline

    made = []
    make = pipeline.make_data_report
    monkeypatch.setattr(pipeline, "make_data_report", lambda cfg, folder: (made.append(folder), make(cfg, folder)))
    cfg = compose_config("pipeline", [f"data.root={flat_root}", "data.cache=false", "data.progress=false"])
    work = tmp_path / "work"

    def report(inputs: dict, **kw) -> Path:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        out.mkdir()
        pipeline.data_report(cfg, "data", work, out, inputs, **kw)
        return out

    with caplog.at_level(logging.INFO, logger="clipdiff.pipeline"):
        first = report({"label": 1.0})
        assert len(made) == 1 and "[data] reused" not in caplog.text
        again = report({"label": 1.0})
        assert len(made) == 1 and f"[data] reused {work / 'data'}" in caplog.text
    for name in ("dataset_statistics.json", "contact_sheet.png"):
        assert (again / name).read_bytes() == (first / name).read_bytes() == (work / "data" / name).read_bytes()
    report({"label": 2.0})  # the labels were made again
    assert len(made) == 2
    report({"label": 2.0}, rerun=True)
    assert len(made) == 3
    with open_dict(cfg):
        cfg.seed = 1  # another contact sheet
    report({"label": 2.0})
    assert len(made) == 4
    report({"label": 2.0})
    assert len(made) == 4
