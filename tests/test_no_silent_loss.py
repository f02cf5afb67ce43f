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
from conftest import TINY_DDPM, write_srn

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    table = {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car"}
    return write_srn(tmp_path_factory.mktemp("nsl") / "flat",
                     {"cars_train": table, "cars_val": {"b1": "a red car"}, "cars_test": {"c1": "a blue car"}})


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run(command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"clipdiff.{command}", *args], env=env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_all(commands: dict[str, list[str]], at_once: int = 2) -> dict[str, subprocess.CompletedProcess]:
    """``python -m clipdiff.<command> …`` for each entry, ``at_once`` at a time (they mostly import torch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(at_once) as pool:
        futures = {name: pool.submit(run, *cmd) for name, cmd in commands.items()}
        return {name: f.result() for name, f in futures.items()}


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


def earlier_run(run_dir: Path) -> dict[str, bytes]:
    """A run directory as a finished training run leaves it (the files that matter: export, checkpoints, logs)."""
    files = {"export.pt": b"the earlier export", "checkpoints/last.ckpt": b"the earlier checkpoint",
             "csv/version_0/metrics.csv": b"step,train/loss\n0,1.0\n", "train.log": b"earlier log\n",
             ".hydra/config.yaml": b"the earlier config\n"}
    for name, data in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)
    return files


@pytest.mark.slow
def test_train_never_writes_over_an_earlier_run(root, tmp_path):
    used = tmp_path / "used"
    files = earlier_run(used)
    args = [*TINY_DDPM, f"data.root={root}", f"hydra.run.dir={used}", "trainer.max_steps=1"]
    line = one_error_line(run("train", *args))
    assert f"hydra.run.dir={used} already holds a run" in line and "overwrite=true" in line and "ckpt_path=last" in line
    assert all((used / name).read_bytes() == data for name, data in files.items() if not name.startswith(".hydra"))
    (kept,) = used.glob(".hydra.bak-*")  # Hydra writes .hydra/ before any command: the earlier one is kept
    assert (kept / "config.yaml").read_bytes() == files[".hydra/config.yaml"]

    proc = run("train", *args, "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, data in files.items():  # every earlier file is kept beside, as <top>.bak-<time>
        top, _, rest = name.partition("/")
        if top.endswith(".log") or top == ".hydra":
            continue  # Hydra's log of this directory is appended to, as before; .hydra/ is checked above
        (kept,) = used.glob(f"{top}.bak-*")
        assert (kept / rest if rest else kept).read_bytes() == data, name
    assert (used / "export.pt").read_bytes() != files["export.pt"] and (used / "checkpoints" / "last.ckpt").is_file()


def read_only(path: Path) -> None:
    """A folder nobody can write to (root ignores permission bits, not the immutable flag)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)


def writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


@pytest.mark.slow
def test_bad_input_gives_one_line_naming_the_key_or_file(root, tmp_path):
    ro = tmp_path / "ro"
    ro_run = tmp_path / "ro_run"
    foreign = tmp_path / "judge.ckpt"  # a training checkpoint of another model
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(3, 4)}, "loops": {}}, foreign)
    base = [*TINY_DDPM, f"data.root={root}", "trainer.max_steps=1"]
    cases = {  # what is given → what the line must name
        "init_from": (["train", "model=noisy_clip", f"data.root={root}", "logger=csv", "data.cache=false",
                       f"model.init_from={tmp_path / 'missing.pt'}"],
                      ["model.init_from=", "missing.pt"]),
        "lr": (["train", *base, "model.optimizer.lr=abc"], ["model.optimizer.lr='abc'", "number"]),
        "num_samples": (["sample", f"ddpm_ckpt={tmp_path / 'x.pt'}", "num_samples=abc"], ["num_samples='abc'"]),
        "output": (["train", *base, f"hydra.run.dir={ro / 'run'}"], [str(ro / "run"), "writable"]),
        "checkpoints": (["train", *base, f"hydra.run.dir={ro_run}"], [str(ro_run / "checkpoints"), "writable"]),
        "foreign": (["train", *base, f"ckpt_path={foreign}"], [f"ckpt_path={foreign}", "another model", "model="]),
    }
    read_only(ro)
    read_only(ro_run / "checkpoints")
    try:
        results = run_all({name: args for name, (args, _) in cases.items()})
    finally:
        writable(ro)
        writable(ro_run / "checkpoints")
    for name, (_, want) in cases.items():
        line = one_error_line(results[name])
        assert all(w in line for w in want), (name, line)


def test_the_same_checks_in_process(flat_root, tmp_path):
    """The cases above that need no subprocess of their own: the DataModule's numbers, a read-only cache folder."""
    from clipdiff.data.datamodule import CarsDataModule
    from clipdiff.errors import ClipdiffError
    from clipdiff.utils.cli import user_error

    for key, value in (("batch_size", 0), ("batch_size", "abc"), ("image_size", 1.5), ("num_workers", -1)):
        with pytest.raises(ClipdiffError, match=f"data.{key}="):
            CarsDataModule(str(flat_root), **{key: value})
    ro = tmp_path / "ro"
    read_only(ro)
    try:
        dm = CarsDataModule(str(flat_root), cache_dir=str(ro / "cache"), progress=False)
        with pytest.raises(OSError) as info:
            dm.prepare_data()
    finally:
        writable(ro)
    line = user_error(info.value)
    assert line and str(ro / "cache") in line and "writable" in line and "data.cache_dir" in line
