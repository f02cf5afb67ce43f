"""Resume after a kill: a tiny DDPM run killed with SIGKILL mid-epoch (after a step checkpoint) and one stopped
by SIGTERM continue from their checkpoints and end bit-for-bit where an uninterrupted run ends (weights, EMA,
optimizer, LR scheduler, step and epoch); checkpoint writes are atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_DDPM, compose_config, write_srn

from clipdiff.errors import ClipdiffError
from clipdiff.train import resolve_ckpt_path, train
from clipdiff.utils.resume import AtomicCheckpointIO

TESTS = Path(__file__).resolve().parent

# 6 objects × 3 views = 18 images, batch 4 → 4 steps per epoch, 2 epochs; step checkpoints at steps 3 and 6
RUN = [
    *TINY_DDPM, "model.ema_decay=0.9",
    "model.scheduler.num_warmup_steps=2", "trainer.max_epochs=2",
    "callbacks.step_checkpoint.every_n_train_steps=3",
    # the monitored metric never improves after epoch 0: last.ckpt must still be written at every epoch's end
    "model.monitor.metric=epoch", "model.monitor.mode=min",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    table = {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car", "a5": "a green car",
             "a6": "a red car"}
    return write_srn(tmp_path_factory.mktemp("resume") / "flat",
                     {"cars_train": table, "cars_val": {"b1": "a red car", "b2": "a white car"},
                      "cars_test": {"c1": "a blue car"}})


def start_and_hold(root: Path, run_dir: Path, step: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    """``python -m clipdiff.train`` that stops after optimizer step ``step`` and waits for a signal (in a session of
    its own, so that a signal to its process group is what a terminal's Ctrl-C sends)."""
    marker = run_dir.parent / f"{run_dir.name}.held"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "clipdiff.train", *RUN, *extra, f"data.root={root}", f"hydra.run.dir={run_dir}",
           "+callbacks.hold._target_=scaleout_helpers.HoldAt", f"+callbacks.hold.step={step}",
           f"+callbacks.hold.marker={marker}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, marker


_REFERENCE: dict[str, dict] = {}


def reference(root: Path, tmp_path_factory) -> dict:
    """``last.ckpt`` of the uninterrupted run (trained once per module, in this process)."""
    if "ckpt" not in _REFERENCE:
        out = tmp_path_factory.mktemp("reference")
        _, objects = train(compose_config("train", [*RUN, f"data.root={root}", f"paths.run_dir={out}"]))
        assert isinstance(objects["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)
        _REFERENCE["ckpt"] = load(out / "checkpoints" / "last.ckpt")
    return _REFERENCE["ckpt"]


def wait_for(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached its hold point:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(got: dict, want: dict) -> None:
    """Everything that decides the rest of training is equal. Not compared: the checkpoint's ``epoch`` field, which
    is Lightning's ``epoch_progress.current.completed``: a run restarted from a checkpoint written inside
    ``on_train_batch_end`` (a step checkpoint) sets completed = processed at its start (``FitLoop.on_run_start``),
    so its final checkpoint says epoch 2 where the uninterrupted run's says 1. ``processed`` (2 in both) is what a
    later resume starts from, and that same ``on_run_start`` makes the two agree again."""
    assert got["global_step"] == want["global_step"]
    progress = [c["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] for c in (got, want)]
    assert progress[0] == progress[1]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():  # unet.*, ema.module.* and ema.n_averaged
        assert torch.equal(got["state_dict"][k], v), k
    (opt_got,), (opt_want,) = got["optimizer_states"], want["optimizer_states"]
    assert opt_got["state"].keys() == opt_want["state"].keys()
    for i, state in opt_want["state"].items():  # AdamW step, exp_avg, exp_avg_sq of every parameter
        for name, value in state.items():
            assert torch.equal(opt_got["state"][i][name], value), (i, name)
    assert got["lr_schedulers"] == want["lr_schedulers"]
    loader = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (got, want)]
    assert loader[0] == loader[1]


@pytest.mark.slow
@pytest.mark.xdist_group("resume_reference")  # one worker trains the reference for both (--dist loadgroup)
def test_sigkill_and_sigterm_runs_resume_to_the_uninterrupted_state(root, tmp_path, tmp_path_factory):
    # both interrupted runs go at once (2 cores); the uninterrupted reference trains meanwhile in this process
    killed, killed_marker = start_and_hold(root, tmp_path / "killed", step=7)  # last step checkpoint: step 6
    termed, termed_marker = start_and_hold(root, tmp_path / "termed", step=5)
    try:
        want = reference(root, tmp_path_factory)
        wait_for(killed, killed_marker)
        killed.send_signal(signal.SIGKILL)
        wait_for(termed, termed_marker)
        termed.send_signal(signal.SIGTERM)
        term_out = termed.communicate(timeout=60)[0]
    finally:
        for p in (killed, termed):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert termed.returncode == 128 + signal.SIGTERM, term_out[-3000:]
    assert "stopped by SIGTERM" in term_out

    assert want["global_step"] == 8 and int(want["state_dict"]["ema.n_averaged"]) == 8

    # SIGKILL: the newest checkpoint is the step-6 one, mid-epoch 1 (2 of its 4 batches done)
    at_kill = load(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert at_kill["global_step"] == 6 and int(at_kill["state_dict"]["ema.n_averaged"]) == 6
    assert at_kill["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    # SIGTERM: the run saved last.ckpt at the step it stopped (5) before exiting
    at_term = load(tmp_path / "termed" / "checkpoints" / "last.ckpt")
    assert at_term["global_step"] == 5 and at_term["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    assert len(at_term["rng_states"]) == 1 and "torch" in at_term["rng_states"][0]

    for name, ckpt in (("killed", str(tmp_path / "killed")), ("termed", str(tmp_path / "termed" / "checkpoints" / "last.ckpt"))):
        out = tmp_path / f"{name}_resumed"
        train(compose_config("train", [*RUN, f"data.root={root}", f"paths.run_dir={out}", f"ckpt_path={ckpt}"]))
        assert_same_state(load(out / "checkpoints" / "last.ckpt"), want)
    # the resumed runs did train: their weights moved from the interruption point
    assert not torch.equal(at_kill["state_dict"]["unet.conv_in.weight"], want["state_dict"]["unet.conv_in.weight"])


@pytest.mark.slow
@pytest.mark.xdist_group("resume_reference")
def test_max_steps_and_ctrl_c_runs_resume_to_the_uninterrupted_state(root, tmp_path, tmp_path_factory):
    """With ``trainer.max_steps`` set (``max_epochs`` still the limit that stops the run), a resume from an epoch-end
    checkpoint lost an epoch; Ctrl-C (SIGINT to the process group) saved nothing. Three runs at once:

    - ``epoch_end``: max_steps=100, SIGKILL at step 5; its newest checkpoint is epoch 0's end (step 4);
    - ``int_last``: max_steps=100, Ctrl-C at step 4, the last batch of epoch 0 (it stops after that epoch ends);
    - ``int_mid``: Ctrl-C at step 6, mid-epoch."""
    runs = {"epoch_end": (5, ["trainer.max_steps=100"]), "int_last": (4, ["trainer.max_steps=100"]), "int_mid": (6, [])}
    procs = {name: start_and_hold(root, tmp_path / name, step, *extra) for name, (step, extra) in runs.items()}
    try:
        want = reference(root, tmp_path_factory)
        for name, (proc, marker) in procs.items():
            wait_for(proc, marker)
            os.killpg(proc.pid, signal.SIGKILL if name == "epoch_end" else signal.SIGINT)
        outs = {name: proc.communicate(timeout=90)[0] for name, (proc, _) in procs.items()}
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
    codes = {name: proc.returncode for name, (proc, _) in procs.items()}
    assert codes == {"epoch_end": -signal.SIGKILL, "int_last": 128 + signal.SIGINT, "int_mid": 128 + signal.SIGINT}, outs
    for name in ("int_last", "int_mid"):
        assert "stopped by SIGINT; continue with" in outs[name] and "Traceback" not in outs[name], outs[name][-3000:]
    assert want["global_step"] == 8  # the reference's last.ckpt is its final epoch's, although that did not improve
    steps = {name: load(tmp_path / name / "checkpoints" / "last.ckpt")["global_step"] for name in runs}
    assert steps == {"epoch_end": 4, "int_last": 4, "int_mid": 6}

    for name, (_, extra) in runs.items():
        out = tmp_path / f"{name}_resumed"
        train(compose_config("train", [*RUN, *extra, f"data.root={root}", f"paths.run_dir={out}",
                                       f"ckpt_path={tmp_path / name}"]))
        assert_same_state(load(out / "checkpoints" / "last.ckpt"), want)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    assert io.load_checkpoint(path)["global_step"] == 1

    def torn(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the old checkpoint is whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_ckpt_path_takes_a_file_a_run_dir_or_last(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ClipdiffError, match="directory without checkpoints/last.ckpt"):
        resolve_ckpt_path(str(run))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path(str(run)) == str(run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(run / "checkpoints" / "last.ckpt")) == str(run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last") == "last" and resolve_ckpt_path(None) is None
    with pytest.raises(ClipdiffError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nothing.ckpt"))


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    from clipdiff.utils.io import atomic_open

    old = os.umask(mask)
    try:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
        with atomic_open(tmp_path / "stage.json", "w") as f:
            f.write("{}")
        with open(tmp_path / "plain.txt", "w") as f:  # what an ordinary write gets
            f.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == want
    for name in ("last.ckpt", "stage.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, oct((tmp_path / name).stat().st_mode)
