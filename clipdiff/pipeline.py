"""The main job, end to end: ``python -m clipdiff.pipeline`` (what ``make demo`` runs).

Each stage is the documented command of one step (``python -m clipdiff.<command> …``) run as a subprocess,
so the pipeline's log shows exactly what to type to redo a step by hand. Stage outputs live under
``pipeline.workdir`` (default ``outputs/demo``); a stage that finished with the same command before is reused,
and an interrupted training stage resumes from its ``last.ckpt``. The run directory of the pipeline itself
holds the log, the dataset statistics, the contact sheet and the report; ``outputs/latest_demo`` points at it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.cli import hydra_entry, run_dir
from clipdiff.utils.io import atomic_open

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
    args = flatten(OmegaConf.to_container(stage.get("args") or {}, resolve=True))
    return [f"{k}={override_value(v)}" for k, v in args.items()]


def stage_command(stage: DictConfig, stage_dir: Path) -> list[str]:
    args = stage_args(stage)
    if stage.get("hydra_run_dir", True):
        args.append(f"hydra.run.dir={stage_dir}")
    last = stage_dir / "checkpoints" / "last.ckpt"
    if stage.command == "train" and last.is_file() and not (stage_dir / MARKER).is_file():
        args.append(f"ckpt_path={last}")  # an interrupted training stage continues where it stopped
    return [sys.executable, "-m", f"clipdiff.{stage.command}", *args]


def run_stage(name: str, stage: DictConfig, workdir: Path) -> dict:
    stage_dir = workdir / name
    marker = stage_dir / MARKER
    cmd = stage_command(stage, stage_dir)
    shown = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
    if marker.is_file() and json.loads(marker.read_text()).get("args") == stage_args(stage):
        log.info("[%s] reused %s", name, stage_dir)
        return {**json.loads(marker.read_text()), "stage": name, "dir": stage_dir, "reused": True}
    log.info("[%s] %s", name, shown)
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise ClipdiffError(f"stage '{name}' failed (exit {proc.returncode}); rerun the pipeline to continue, or run: {shown}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = {"args": stage_args(stage), "command": shown, "seconds": round(time.time() - t0, 1)}
    with atomic_open(marker, "w") as f:
        json.dump(record, f, indent=1)
    log.info("[%s] done in %.0f s", name, time.time() - t0)
    return {**record, "stage": name, "dir": stage_dir, "reused": False}


def data_report(cfg: DictConfig, out: Path) -> None:
    """Dataset statistics and the contact sheet, written into the pipeline's run directory."""
    from hydra.utils import instantiate

    from clipdiff.data.preview import contact_sheet, format_statistics

    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    stats = dm.statistics()
    with atomic_open(out / "dataset_statistics.json", "w") as f:
        json.dump(stats, f, indent=1)
    log.info("dataset %s\n%s", cfg.data.root, format_statistics(stats))
    sheet = contact_sheet(dm._dataset("train"), out / "contact_sheet.png", seed=cfg.seed)
    log.info("contact sheet: %s", sheet)


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
    only = set(cfg.only) if cfg.get("only") else None
    t0 = time.time()
    records = []
    for name, stage in cfg.stages.items():
        if only and name not in only:
            continue
        if stage.command == "data_report":
            data_report(cfg, out)
        else:
            records.append(run_stage(name, stage, workdir))
    report = write_report(out, records)
    log.info("report: %s", report)
    point_latest(Path(cfg.paths.output_dir) / "latest_demo", out)
    log.info("pipeline finished in %.0f s", time.time() - t0)
    print(f"run directory: {out}")
    print(f"latest demo:   {Path(cfg.paths.output_dir) / 'latest_demo'}")
    OmegaConf.save(cfg, out / "pipeline.yaml")


if __name__ == "__main__":
    main()
