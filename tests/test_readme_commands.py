"""Every ``python -m clipdiff.…`` command the README shows works as written.

The commands are read from the README itself (code blocks, tables and prose), their placeholders (``DIR``,
``…``, ``RUN/export.pt``, ``[optional]`` parts) filled with tiny files the test makes, and each is run as a
subprocess the way a user types it: sweeps (``-m``, the Optuna search) run for real with tiny overrides appended,
the SLURM launch is composed with ``--cfg hydra``, every other Hydra command is composed with ``--cfg job``, and the
argparse tools answer ``--help`` with every flag the README gives them. A README command the test cannot place
fails the test, so the README cannot drift from the code again.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import write_srn
from omegaconf import OmegaConf
from tiny_guides import clip_export, ddpm_export, judge_export, noisy_clip_export

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ARGPARSE_TOOLS = {"clipdiff.eval.readme", "clipdiff.bench", "clipdiff.labeling.fit_body"}

# appended to a command that really runs: as small as the command allows
TINY = {
    "clipdiff.train": ["data.cache=false", "data.progress=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                       "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"],
    "clipdiff.sample": ["num_samples=2", "batch_size=2", "sampler.steps=2", "progress=false"],
    "clipdiff.evaluate": ["data.cache=false", "sampler.steps=2", "num_per_caption=2", "num_captions=2", "num_real=4",
                          "c2st.folds=2", "c2st.repeats=1", "controls.num=2", "progress=false", "wandb.enabled=false"],
    "clipdiff.aggregate": [],
}


def readme_commands(text: str | None = None) -> list[str]:
    """Each ``python -m clipdiff.…`` command of the README once, in order, with its line breaks folded."""
    text = README.read_text() if text is None else text
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        found += [line.split("#")[0].strip() for line in joined.splitlines() if "python -m clipdiff" in line]
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    found += [m.group(1) for m in re.finditer(r"`(python -m clipdiff[^`]*)`", prose)]
    out = []
    for cmd in (" ".join(c.split()) for c in found):
        if cmd not in out:
            out.append(cmd)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A project folder (``CLIPDIFF_ROOT``, the working directory) with a tiny dataset and tiny exports."""
    tmp = tmp_path_factory.mktemp("readme")
    project = tmp / "project"
    project.mkdir()
    root = write_srn(tmp / "data", {
        "cars_train": {"a1": "a red car", "a2": "a red car", "a3": "a green jeep/bus", "a4": "a white car",
                       "a5": "a blue car", "a6": "a white car"},
        "cars_val": {"b1": "a red car", "b2": "a white car"},
        "cars_test": {"c1": "a red car", "c2": "a green jeep/bus"}})
    (root / "ground_truth.tsv").write_text((root / "cars_text" / "cars_train.tsv").read_text())
    return {"project": project, "root": root, "ddpm": ddpm_export(tmp / "ddpm.pt"), "clip": clip_export(tmp / "clip.pt"),
            "noisy_clip": noisy_clip_export(tmp / "noisy.pt"), "judge": judge_export(tmp / "judge.pt")}


def fill(cmd: str, world: dict, sweep_dir: Path | None = None) -> tuple[str, list[str]]:
    """(module, argv after the module) with every placeholder replaced by a real file of ``world``."""
    tokens = shlex.split(cmd)
    assert tokens[:2] == ["python", "-m"], cmd
    module, args = tokens[2], tokens[3:]
    ckpts = {"ddpm_ckpt": world["ddpm"], "clip_ckpt": world["clip"], "noisy_clip_ckpt": world["noisy_clip"],
             "judge_ckpt": world["judge"]}
    guidance = next((a.split("=", 1)[1] for a in args if a.startswith("guidance=")), "noisy_clip")
    ckpts["guide_ckpt"] = world.get(guidance, world["noisy_clip"])
    out = []
    for a in args:
        if re.fullmatch(r"\[[\w./@-]+=.*\]", a):
            continue  # an optional part, e.g. [trainer=gpu]
        if a == "…":  # evaluate's "…" is its checkpoints and data; elsewhere "more settings if you like"
            if module == "clipdiff.evaluate":
                out += [f"{k}={v}" for k, v in ckpts.items() if k != "guide_ckpt"] + [f"data.root={world['root']}"]
            continue
        key, _, value = a.partition("=")
        if value == "…" and key in ckpts:
            a = f"{key}={ckpts[key]}"
        a = a.replace("RUN/export.pt", str(world["ddpm"])).replace("CLIP/export.pt", str(world["clip"]))
        a = a.replace("GUIDE/export.pt", str(ckpts["guide_ckpt"]))
        if sweep_dir is not None:
            a = a.replace("outputs/<task>/multiruns/<timestamp>", str(sweep_dir))
        a = a.replace("outputs/aggregate/runs/<timestamp>", str(world["project"] / "outputs" / "aggregate" / "runs" / "x"))
        a = re.sub(r"(?<![\w/])DIR(?![\w])", str(world["root"]), a)
        out.append(a)
    unknown = [a for a in out if "…" in a or re.search(r"<\w+>|\b[A-Z]{3,}\b", a)]
    assert not unknown, f"README command {cmd!r}: the test does not know what to put for {unknown}"
    return module, out


def run(module: str, args: list[str], world: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLIPDIFF_ROOT": str(world["project"]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=world["project"], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def sweeps() -> list[str]:
    """The multirun commands: ``-m`` after the module, or a search that implies it."""
    return [c for c in readme_commands() if "-m" in shlex.split(c)[3:] or "hparams_search=" in c]


def the_sweep(world: dict, module: str, marker: str) -> tuple[str, list[str]]:
    matches = [c for c in sweeps() if f"-m {module} " in c and marker in c and "launcher=slurm" not in c]
    assert len(matches) == 1, f"the README should show one {module} sweep with {marker!r}: {matches}"
    return fill(matches[0], world)


def run_sweep(world: dict, module: str, marker: str, task: str, *extra: str) -> Path:
    """Run the README's sweep of ``module`` whose command holds ``marker``, with ``extra`` and the tiny overrides
    appended; return the one new sweep directory under ``outputs/<task>/multiruns/`` (where the README says)."""
    module, args = the_sweep(world, module, marker)
    sweeps_dir = world["project"] / "outputs" / task / "multiruns"
    before = set(sweeps_dir.glob("*"))
    done = run(module, [*args, *extra, *TINY[module]], world)
    assert done.returncode == 0, f"{module}: {done.stderr[-3000:]}"
    (sweep,) = set(sweeps_dir.glob("*")) - before
    return sweep


@pytest.fixture(scope="module")
def train_sweep(world) -> Path:
    """The README's training sweep, as written, on the tiny set."""
    return run_sweep(world, "clipdiff.train", "model.optimizer.lr=", "train_clip", f"data.root={world['root']}")


def test_the_readme_shows_every_kind_of_command():
    commands = readme_commands()
    modules = {shlex.split(c)[2] for c in commands}
    assert {"clipdiff.train", "clipdiff.sample", "clipdiff.evaluate", "clipdiff.render", "clipdiff.label",
            "clipdiff.pipeline", "clipdiff.aggregate"} <= modules
    assert len(sweeps()) >= 5  # training, Optuna, SLURM, sample and evaluate sweeps
    # the reader folds wrapped commands and drops optional parts
    text = "x `python -m clipdiff.train -m a=1\n  b=2 [c=3]` y\n```bash\npython -m clipdiff.render x=1 \\\n  y=2  # z\n```\n"
    assert readme_commands(text) == ["python -m clipdiff.render x=1 y=2", "python -m clipdiff.train -m a=1 b=2 [c=3]"]


@pytest.mark.xdist_group("readme_train_sweep")  # one worker runs the sweep for both tests (--dist loadgroup)
def test_training_sweep_runs_lands_in_its_task_folder_and_shares_a_wandb_group(train_sweep, world):
    jobs = sorted(p for p in train_sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"] and (train_sweep / "multirun.yaml").is_file()
    lrs = []
    for job in jobs:
        assert (job / "export.pt").is_file()
        hparams = yaml.safe_load((job / "csv" / "hparams.yaml").read_text())  # the job's resolved config
        assert hparams["task_name"] == "train_clip" and hparams["logger"]["wandb"]["group"] == "train_clip"
        lrs.append(hparams["model"]["optimizer"]["lr"])
        assert list((job / "wandb").glob("offline-run-*")), "the job's wandb run is missing"
    assert sorted(lrs) == [1e-3, 2e-3]
    # the README's sync command finds both runs (a bash without globstar matched nothing with outputs/**/…)
    (sync,) = re.findall(r"`(find outputs [^`]*wandb sync[^`]*)`", README.read_text())
    listing = subprocess.run(sync.split(" -exec ")[0], shell=True, cwd=world["project"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len([p for p in listing if "/train_clip/multiruns/" in p]) == 2


@pytest.mark.xdist_group("readme_train_sweep")
def test_aggregate_turns_the_training_sweep_into_its_table(train_sweep, world):
    commands = [c for c in readme_commands() if "clipdiff.aggregate sweep_dir=" in c]
    (cmd,) = [c for c in commands if "spread_over" not in c]
    # the seed-spread command aggregates the README's seed sweep (its spread is tested on a pipeline sweep in
    # test_aggregate.py): it names the override that sweep varies
    assert any("spread_over=seed" in c for c in commands)
    assert any("clipdiff.pipeline -m seed=0,1,2" in c for c in readme_commands())
    module, args = fill(cmd, world, sweep_dir=train_sweep)
    done = run(module, args, world)
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = sorted((world["project"] / "outputs" / "aggregate" / "runs").glob("*"))
    with (out / "aggregate.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"] and all(r["kind"] == "train" for r in rows)
    assert sorted(float(r["model.optimizer.lr"]) for r in rows) == [1e-3, 2e-3]
    assert all(0.0 <= float(r["val/acc_caption"]) <= 1.0 for r in rows)


def test_optuna_search_runs_as_written(world):
    sweep = run_sweep(world, "clipdiff.train", "hparams_search=clip_optuna", "train_clip", "hydra.sweeper.n_trials=1",
                      f"data.root={world['root']}", "logger=csv")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= best["best_value"] <= 1.0 and "model.optimizer.lr" in best["best_params"]


def test_sample_and_evaluate_sweeps_run_as_written(world):
    sweeps_made = {}
    for module, marker, task, jobs in (("clipdiff.sample", "guidance.scale=", "sample", 5),
                                       ("clipdiff.evaluate", "scales=", "evaluate", 4)):
        sweeps_made[task] = run_sweep(world, module, marker, task)
        found = sorted(int(p.name) for p in sweeps_made[task].iterdir() if p.name.isdigit())
        assert found == list(range(jobs)), module
    # each sample job ran with its own scale, and the scale reached the sampler (the images differ)
    jobs = [sweeps_made["sample"] / str(n) for n in range(5)]
    assert [json.loads((j / "sample.json").read_text())["guidance"]["scale"] for j in jobs] == [0, 1, 2, 4, 8]
    assert (jobs[0] / "samples" / "000000.png").read_bytes() != (jobs[-1] / "samples" / "000000.png").read_bytes()


def test_slurm_launch_composes(world):
    (cmd,) = [c for c in readme_commands() if "hydra/launcher=slurm" in c]
    module, args = fill(cmd, world)
    done = run(module, ["--cfg", "all", *(a for a in args if a != "-m")], world)  # Hydra takes -m or --cfg
    assert done.returncode == 0, done.stderr[-3000:]
    launcher = OmegaConf.create(done.stdout).hydra.launcher  # nodes etc. are ${trainer.…}: resolved on access
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.timeout_min == 720
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)


def compose_or_help(cmd: str, world: dict) -> str | None:
    """None when the command composes (Hydra) or its flags exist (argparse tools); else what went wrong."""
    module, args = fill(cmd, world)
    if module in ARGPARSE_TOOLS:
        done = run(module, ["--help"], world, timeout=300)
        missing = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in done.stdout]
        return None if done.returncode == 0 and not missing else f"{cmd}: {done.stderr[-500:]} missing {missing}"
    extra = [] if "--help" in args else ["--cfg", "job"]
    done = run(module, [*extra, *args], world, timeout=300)
    return None if done.returncode == 0 else f"{cmd}:\n{done.stderr[-1500:]}"


def test_every_other_readme_command_composes(world):
    others = [c for c in readme_commands() if c not in sweeps() and "sweep_dir=" not in c]  # aggregate: above
    assert len(others) >= 10
    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for p in pool.map(lambda c: compose_or_help(c, world), others) if p]
    assert not problems, "\n\n".join(problems)


def test_the_readmes_local_config_is_read_by_every_command_that_loads_it(world, tmp_path):
    """``conf/local/default.yaml`` as the README writes it lands at the top level (not under ``local.``)."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL) if "conf/local/default.yaml" in b]
    expected = yaml.safe_load(block)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text(block)
    search = f"hydra.searchpath=[file://{tmp_path}]"
    done = run("clipdiff.train", ["--cfg", "job", search], world, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load(done.stdout)["data"]["root"] == expected["data"]["root"]
    for name in ("sample", "evaluate", "label"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(name, overrides=[search])
        assert "local" not in cfg and cfg.paths.output_dir == expected["paths"]["output_dir"], name
    GlobalHydra.instance().clear()


def test_the_readmes_python_api_block_runs_as_written(world, tmp_path):
    """The README's Python example, with the demo's exports where it looks for them (tiny ones here)."""
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL) if "GuidedPipeline" in b]
    project = tmp_path / "project"
    for stage in ("ddpm", "noisy_clip", "clip"):
        (project / "outputs" / "demo" / stage).mkdir(parents=True)
        (project / "outputs" / "demo" / stage / "export.pt").write_bytes(world[stage].read_bytes())
    done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    written = [p for p in project.iterdir() if p.suffix == ".png"]
    assert len(written) == 1 and written[0].stat().st_size > 100
