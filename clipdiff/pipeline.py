"""The main job, end to end: ``python -m clipdiff.pipeline`` (what ``make demo`` runs).

Each stage is the documented command of one step (``python -m clipdiff.<command> …``) run as a subprocess,
so the pipeline's log shows exactly what to type to redo a step by hand. Stage outputs live under
``pipeline.workdir`` (default ``outputs/demo``); a stage that finished with the same command on the same inputs
before is reused (``rerun=[clip]`` or ``rerun=all`` forces stages, and whatever is after them, to run again),
and an interrupted training stage resumes from its ``last.ckpt``. The run directory of the pipeline itself
holds the log, the dataset statistics, the contact sheet and the report; ``outputs/latest_<workdir name>``
(``outputs/latest_demo``) points at the newest run that ran every stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.cli import hydra_entry, run_dir
from clipdiff.utils.io import atomic_open
from clipdiff.utils.procs import LoggedProcess, stop_requests, terminate_all

log = logging.getLogger("clipdiff.pipeline")

MARKER = "stage.json"


def override_value(value) -> str:
    """A config value written as a Hydra command-line override value."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def flatten(args: dict, prefix: str = "") -> dict:
    """``{"trainer": {"max_steps": 2}}`` → ``{"trainer.max_steps": 2}`` (a dotted key on the command line nests)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_args(stage: DictConfig) -> list[str]:
    """``stages.<name>.args`` (a mapping ``key: value``) as ``key=value`` overrides."""
    args = flatten(OmegaConf.to_container(stage.args, resolve=True)) if stage.get("args") else {}
    return [f"{k}={override_value(v)}" for k, v in args.items()]


TRAINER_KEYS = ("devices", "num_nodes", "precision")


def trainer_args(cfg: DictConfig) -> list[str]:
    """The pipeline's ``trainer=`` choice as overrides for a training stage: the preset, then its devices, nodes and
    precision as composed here (so ``trainer=ddp trainer.devices=4`` reaches every training stage). None chosen: []."""
    if not cfg.get("trainer"):
        return []
    from clipdiff.utils.resolvers import group_choice

    choice = group_choice("trainer", _root_=cfg)
    return [f"trainer={choice}", *(f"trainer.{k}={override_value(cfg.trainer[k])}" for k in TRAINER_KEYS
                                   if k in cfg.trainer)]


def stage_command(stage: DictConfig, stage_dir: Path, args: list[str]) -> list[str]:
    """``python -m clipdiff.<command> args…`` with the stage's run directory and, for an interrupted training stage,
    the checkpoint it continues from."""
    args = list(args)
    if stage.get("hydra_run_dir", True):
        args.append(f"hydra.run.dir={stage_dir}")
    last = stage_dir / "checkpoints" / "last.ckpt"
    if stage.command == "train" and last.is_file() and not (stage_dir / MARKER).is_file():
        args.append(f"ckpt_path={last}")  # an interrupted training stage continues where it stopped
    return [sys.executable, "-m", f"clipdiff.{stage.command}", *args]


def stage_threads(stage: DictConfig, cfg: DictConfig) -> int:
    """Torch/OpenMP threads of a stage: ``stages.<name>.threads``, else ``threads`` (``auto``: CPUs ÷ ``jobs``;
    ``all``: every CPU)."""
    value, cpus = stage.get("threads") or cfg.get("threads") or "auto", os.cpu_count() or 1
    if value == "auto":
        return max(1, cpus // max(1, int(cfg.get("jobs") or 1)))
    if value == "all":
        return cpus
    try:
        return max(1, int(value))
    except ValueError:
        raise ClipdiffError(f"threads={value!r}: use a number, auto or all") from None


def dependencies(cfg: DictConfig, names: list[str]) -> dict[str, list[str]]:
    """``stages.<name>.after`` (default: the stage before it), checked against the stage names."""
    deps = {}
    for i, name in enumerate(names):
        after = cfg.stages[name].get("after")
        after = [names[i - 1]] if after is None and i else list(after or [])
        unknown = [d for d in after if d not in cfg.stages]
        if unknown:
            raise ClipdiffError(f"stages.{name}.after names unknown stage(s) {unknown}; stages: {list(cfg.stages)}")
        deps[name] = after
    return deps


def stage_selection(cfg: DictConfig, key: str) -> set[str] | None:
    """``only`` / ``rerun``: a list of stage names, or ``all``; checked against the stages (None: not set)."""
    value = cfg.get(key)
    if not value:
        return None
    if value == "all":
        return set(cfg.stages)
    unknown = sorted(set(value) - set(cfg.stages))
    if unknown:
        raise ClipdiffError(f"{key}={sorted(value)} names unknown stage(s) {unknown}; stages: {list(cfg.stages)}")
    return set(value)


def check_selection_inputs(cfg: DictConfig, names: list[str], workdir: Path) -> None:
    """With ``only``, every stage a chosen stage is after must be chosen too or have finished in ``workdir``
    before (an in-process stage such as the data report is looked through: its own inputs count)."""
    deps, chosen = dependencies(cfg, list(cfg.stages)), set(names)

    def missing(stage: str) -> list[str]:
        out = []
        for d in deps[stage]:
            if d in chosen:
                continue
            if cfg.stages[d].command == "data_report":
                out += missing(d)
            elif not read_marker(workdir / d):
                out.append(d)
        return out

    for name in names:
        lacking = missing(name)
        if lacking:
            fix = [n for n in cfg.stages if n in chosen or n in lacking]
            raise ClipdiffError(f"only={names}: stage '{name}' needs {lacking}, which has not finished in {workdir}; "
                                f"add it: only=[{','.join(fix)}]")


def read_marker(stage_dir: Path) -> dict:
    marker = stage_dir / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def same_run(record: dict, args: list[str], inputs: dict[str, float | None]) -> bool:
    """Whether a stage's marker is of a run with these arguments on these inputs (it can be reused)."""
    return bool(record) and record.get("args") == args and record.get("inputs") == inputs


def write_marker(stage_dir: Path, record: dict) -> None:
    """The stage finished: its marker, written last and atomically (a stage without one is unfinished)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(stage_dir / MARKER, "w") as f:
        json.dump(record, f, indent=1)


def input_stamps(cfg: DictConfig, deps: dict[str, list[str]], name: str, workdir: Path) -> dict[str, float | None]:
    """When each stage that ``name`` is after last finished (None: never), looking through in-process stages."""
    stamps: dict[str, float | None] = {}
    for d in deps[name]:
        if cfg.stages[d].command == "data_report":
            stamps.update(input_stamps(cfg, deps, d, workdir))
        else:
            stamps[d] = read_marker(workdir / d).get("finished")
    return stamps


class Stage:
    """One stage: its command, its directory, its reuse marker and (while it runs) its process.

    A finished stage is reused when its arguments are the same and every stage it is ``after`` is the very run it
    was built from (the marker keeps their finish times): a stage whose input was rebuilt runs again."""

    def __init__(self, name: str, stage: DictConfig, workdir: Path, threads: int, inputs: dict[str, float | None],
                 extra_args: list[str] = ()):
        self.name, self.stage, self.dir, self.threads, self.inputs = name, stage, workdir / name, threads, inputs
        self.args = [*extra_args, *stage_args(stage)]  # the stage's own args come last: they win
        self.cmd = stage_command(stage, self.dir, self.args)
        self.shown = " ".join(shlex.quote(c) for c in ["python", *self.cmd[1:]])
        self.process: LoggedProcess | None = None

    def reusable(self) -> dict | None:
        record = read_marker(self.dir)
        if same_run(record, self.args, self.inputs):
            return {**record, "stage": self.name, "dir": self.dir, "reused": True}
        if record:
            changed = [d for d, t in self.inputs.items() if (record.get("inputs") or {}).get(d) != t]
            why = f"input(s) {', '.join(changed)} rebuilt since" if changed else "its arguments changed"
            log.info("[%s] runs again: %s", self.name, why)
        return None

    def start(self) -> None:
        # a finished run that is not reused, or an unfinished one that this command does not resume (stopped before
        # its first checkpoint): kept beside, never overwritten
        resumes = any(a.startswith("ckpt_path=") for a in self.cmd)
        unfinished = self.stage.get("hydra_run_dir", True) and self.dir.is_dir() and any(self.dir.iterdir())
        if (self.dir / MARKER).is_file() or (unfinished and not resumes):
            kept = self.dir.with_name(f"{self.name}.replaced-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}")
            os.replace(self.dir, kept)
            log.info("[%s] its previous outputs are kept in %s", self.name, kept)
        log.info("[%s] %s   (%d thread%s; log: %s)", self.name, self.shown, self.threads, "s" * (self.threads > 1),
                 self.dir.parent / f"{self.name}.log")
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        self.process = LoggedProcess(self.name, self.cmd, self.dir.parent / f"{self.name}.log", env=env)

    def finish(self) -> dict:
        seconds = round(time.time() - self.process.started, 1)
        record = {"args": self.args, "inputs": self.inputs, "command": self.shown, "seconds": seconds,
                  "threads": self.threads, "started": round(self.process.started, 2), "finished": round(time.time(), 2)}
        write_marker(self.dir, record)
        log.info("[%s] done in %.0f s", self.name, seconds)
        return {**record, "stage": self.name, "dir": self.dir, "reused": False}


def run_stages(cfg: DictConfig, names: list[str], workdir: Path, on_ready) -> list[dict]:
    """Run the stages as their inputs (``after``) finish, at most ``cfg.jobs`` at once, in config order.

    ``on_ready(name)`` runs an in-process stage (``command: data_report``). A failed stage stops the others with
    SIGTERM (training stages write ``last.ckpt`` first), so rerunning the pipeline continues all of them. So does
    SIGTERM or SIGINT (Ctrl-C) to the pipeline: it is passed on to the running stages as SIGTERM, the pipeline waits
    for them to save and exit, says how to continue, and exits with 128 + the signal.
    """
    with stop_requests() as stop:
        return _run_stages(cfg, names, workdir, on_ready, stop)


def stop_stages(running: dict[str, Stage], signum: int, records: dict) -> None:
    """Pass a stop on to the running stages (SIGTERM: training stages save ``last.ckpt``), wait for them, and exit
    with 128 + ``signum`` after saying how to continue; a stage that finishes meanwhile is recorded as done."""
    name = signal.Signals(signum).name
    for st in running.values():
        log.warning("[%s] stopping (SIGTERM): the pipeline got %s", st.name, name)
    saved = []
    for st, code in zip(running.values(), terminate_all([st.process for st in running.values()]), strict=True):
        if code == 0:
            records[st.name] = st.finish()
        elif (st.dir / "checkpoints" / "last.ckpt").is_file():
            saved.append(f"{st.name} ({st.dir / 'checkpoints' / 'last.ckpt'})")
    again = " ".join(shlex.quote(a) for a in ["python", "-m", "clipdiff.pipeline", *sys.argv[1:]])
    log.warning("stopped by %s%s; the same command continues (finished stages are reused, training stages resume "
                "from their last.ckpt): %s", name, f"; saved {', '.join(saved)}" if saved else "", again)
    sys.exit(128 + signum)


def _run_stages(cfg: DictConfig, names: list[str], workdir: Path, on_ready, stop: list[int]) -> list[dict]:
    deps = dependencies(cfg, list(cfg.stages))
    selected = set(names)
    todo, running, done, records = list(names), {}, set(), {}
    jobs = max(1, int(cfg.get("jobs") or 1))
    rerun = stage_selection(cfg, "rerun") or set()
    trainer = trainer_args(cfg)
    while todo or running:
        if stop:
            stop_stages(running, stop[0], records)
        for name in list(todo):
            if len(running) >= jobs:
                break
            if any(d in selected and d not in done for d in deps[name]):
                continue
            todo.remove(name)
            stage = cfg.stages[name]
            if stage.command == "data_report":
                on_ready(name)
                done.add(name)
                continue
            st = Stage(name, stage, workdir, stage_threads(stage, cfg), input_stamps(cfg, deps, name, workdir),
                       trainer if stage.command == "train" else ())
            reused = None if name in rerun else st.reusable()
            if reused:
                log.info("[%s] reused %s", name, st.dir)
                records[name] = reused
                done.add(name)
                continue
            st.start()
            running[name] = st
        for name, st in list(running.items()):
            code = st.process.poll()
            if code is None:
                continue
            del running[name]
            if code != 0:
                for other in running.values():
                    log.info("[%s] stopping (SIGTERM): stage '%s' failed", other.name, name)
                terminate_all([other.process for other in running.values()])
                raise ClipdiffError(f"stage '{name}' failed (exit {code}; its log: {workdir / (name + '.log')}); "
                                    f"rerun the pipeline to continue, or run: {st.shown}")
            records[name] = st.finish()
            done.add(name)
        if running:
            time.sleep(0.5)
        elif todo and not any(all(d not in selected or d in done for d in deps[n]) for n in todo):
            raise ClipdiffError(f"stages {todo} wait for each other (stages.<name>.after forms a cycle)")
    return [records[n] for n in names if n in records]


REPORT_FILES = ("dataset_statistics.json", "contact_sheet.png")


def data_report(cfg: DictConfig, name: str, workdir: Path, out: Path, inputs: dict[str, float | None],
                rerun: bool = False) -> None:
    """Dataset statistics and the contact sheet, made in ``<workdir>/<name>`` and copied into the pipeline's run
    directory. Like a finished stage, they are reused while the data settings, the seed and the stages they read
    (``inputs``: the label files' run) are the same and ``rerun`` does not name them; reusing them reads no data
    and imports no Lightning (the DataModule's), which a pipeline whose every stage is reused would otherwise wait
    seconds for."""
    stage_dir = workdir / name
    args = [f"{k}={override_value(v)}"
            for k, v in flatten({"data": OmegaConf.to_container(cfg.data, resolve=True), "seed": cfg.seed}).items()]
    complete = all((stage_dir / f).is_file() for f in REPORT_FILES)
    if not rerun and complete and same_run(read_marker(stage_dir), args, inputs):
        log.info("[%s] reused %s", name, stage_dir)
    else:
        started = time.time()
        make_data_report(cfg, stage_dir)
        write_marker(stage_dir, {"args": args, "inputs": inputs, "seconds": round(time.time() - started, 1),
                                 "finished": round(time.time(), 2)})
    for f in REPORT_FILES:
        shutil.copyfile(stage_dir / f, out / f)
    log.info("contact sheet: %s", out / "contact_sheet.png")


def make_data_report(cfg: DictConfig, folder: Path) -> None:
    from hydra.utils import instantiate

    from clipdiff.data.preview import contact_sheet, format_statistics

    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    stats = dm.statistics()
    with atomic_open(folder / "dataset_statistics.json", "w") as f:
        json.dump(stats, f, indent=1)
    log.info("dataset %s\n%s", cfg.data.root, format_statistics(stats))
    contact_sheet(dm._dataset("train"), folder / "contact_sheet.png", seed=cfg.seed)


def write_report(out: Path, records: list[dict]) -> Path:
    """``report.md`` of the pipeline run: the stage table, the dataset, and the evaluation report (if run)."""
    lines = [f"# clipdiff pipeline — {out.name}", "", "| stage | seconds | reused | command |", "| --- | ---: | --- | --- |"]
    lines += [f"| {r['stage']} | {r.get('seconds', '')} | {'yes' if r.get('reused') else 'no'} | `{r.get('command', '')}` |"
              for r in records]
    if (out / "contact_sheet.png").is_file():
        lines += ["", "## Dataset (training split, a row per caption)", "", "![contact sheet](contact_sheet.png)"]
    evaluation = next((r["dir"] for r in records if r["stage"] == "evaluate"), None)
    if evaluation is not None and (Path(evaluation) / "report.md").is_file():
        link = out / "evaluate"
        link.symlink_to(Path(evaluation).resolve(), target_is_directory=True)
        body = (Path(evaluation) / "report.md").read_text()
        body = re.sub(r"\]\((?!https?:|/|#)", "](evaluate/", body).replace("\n# ", "\n## ")
        lines += ["", body]
    path = out / "report.md"
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def point_latest(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, link)


@hydra_entry("pipeline")
def main(cfg: DictConfig) -> None:
    out = run_dir()
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    only = stage_selection(cfg, "only")
    rerun = stage_selection(cfg, "rerun") or set()  # checked before anything runs
    t0 = time.time()
    names = [n for n in cfg.stages if not only or n in only]
    if only:
        check_selection_inputs(cfg, names, workdir)
    deps = dependencies(cfg, list(cfg.stages))
    records = run_stages(cfg, names, workdir, on_ready=lambda name: data_report(
        cfg, name, workdir, out, input_stamps(cfg, deps, name, workdir), rerun=name in rerun))
    report = write_report(out, records)
    log.info("report: %s", report)
    log.info("pipeline finished in %.0f s on %d CPUs", time.time() - t0, os.cpu_count() or 1)
    print(f"run directory: {out}")
    # outputs/latest_<workdir name> (latest_demo for make demo) names the newest *complete* run of that workdir:
    # eval.readme and make bench read their results from it, so a partial run (only=…) leaves it alone
    latest = Path(cfg.paths.output_dir) / f"latest_{workdir.name}"
    if only:
        print(f"{latest.name} not moved: a partial run (only={sorted(only)})")
    else:
        point_latest(latest, out)
        print(f"latest run:    {latest}")
    OmegaConf.save(cfg, out / "pipeline.yaml")


if __name__ == "__main__":
    main()
