"""What a resumed run needs beyond Lightning's own checkpoint contents (model, optimizer, schedulers, loops,
callbacks, the train loader's position — :mod:`clipdiff.data.resumable`):

- :class:`AtomicCheckpointIO`: Lightning writes a checkpoint to a temporary file in the *system* temp directory and
  moves it into place (a copy, not a rename, when that is another file system; no fsync). This plugin writes it
  beside the target, fsyncs and renames (``clipdiff.utils.io.atomic_open``): a crash never leaves a torn file.
- :class:`ExactResume`: every rank's global RNG states (torch, numpy, python) go into the checkpoint and come
  back before the first batch after the resume (the same noise, timesteps and flips as an uninterrupted run),
  and the train loader gets its saved position even where Lightning skips that.
- :class:`SigtermCheckpoint`: on SIGTERM Lightning stops at the end of the current batch (``SIGTERMException``);
  this callback makes a first SIGINT (Ctrl-C) do the same, and then writes ``last.ckpt``, so ``ckpt_path=<run dir>``
  continues from that very step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clipdiff.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        atomic_torch_save(checkpoint, path)


class ExactResume(Callback):
    """What Lightning leaves out of an exact resume.

    - RNG: every rank's global RNG states go into the checkpoint (key ``rng_states``, a list indexed by rank) and
      are put back just before the first training batch after the resume, or at the start of the epoch when the
      resume starts one (not at load time: building the loader iterators after the load draws from the global RNG).
    - The train loader's position: Lightning saves it, but when ``configure_optimizers`` asks for
      ``trainer.estimated_stepping_batches`` (ours do) the train loader is built before the checkpoint is restored
      and Lightning never hands it the saved state; this callback does, at ``on_train_start`` (the loader's
      iterator is lazy, so nothing has been drawn from it yet).
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states") or []
        if len(states) != trainer.world_size:
            log.warning("the checkpoint holds RNG states of %d rank(s), this run has %d: random draws after the "
                        "resume will differ from the original run's", len(states), trainer.world_size)
            return
        self._rng = states[trainer.global_rank]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        start_after_an_ended_epoch(trainer)
        loop = trainer.fit_loop
        pending = getattr(loop, "_combined_loader_states_to_load", None)
        if pending and getattr(loop, "_combined_loader", None) is not None:
            loop._combined_loader._load_state_dicts(pending)
            loop._combined_loader_states_to_load = []

    def on_train_epoch_start(self, *args: Any) -> None:
        """A resume at an epoch's start (from an epoch-end checkpoint): the states go back before the epoch's loader
        iterator is made, as in the uninterrupted run, which drew its worker seed after writing that checkpoint.
        (Resumed mid-epoch, Lightning skips this hook and the states go back at the first batch.)"""
        self.on_train_batch_start()

    def on_train_batch_start(self, *args: Any) -> None:
        if self._rng is not None:
            _set_rng_states(self._rng)
            self._rng = None


def start_after_an_ended_epoch(trainer: Any) -> None:
    """Resume a checkpoint written at an epoch's end as a run without ``max_steps`` does: the next epoch starts.

    With ``trainer.max_steps`` set, Lightning 2.6 marks every resumed fit loop as restarting
    (``_FitLoop._iteration_based_training``); from a checkpoint written at the end of an epoch (the epoch-end
    ``last.ckpt``, or a stop at an epoch's last batch) it then replays that ended epoch with no batches left, and
    counts it: the resumed run trains one epoch less than the run it continues (when ``max_epochs`` is the limit that
    stops it, it can train nothing at all). Here, before the first epoch starts, the loops are put where a resume
    without ``max_steps`` puts them: the ended epoch counted complete, nothing restarting."""
    loop = trainer.fit_loop
    batches = loop.epoch_loop.batch_progress.current
    if not (loop._iteration_based_training() and loop.restarting):
        return
    if batches.completed < trainer.num_training_batches:  # mid-epoch (or the last batch's own step checkpoint)
        return
    for progress in (loop.epoch_progress.current, loop.epoch_progress.total):
        progress.completed = progress.processed
    for lp in (loop, loop.epoch_loop, loop.epoch_loop.val_loop):
        if hasattr(lp, "reset_restart_stage"):
            lp.reset_restart_stage()
    _Loop.restarting.fset(loop, False)  # the fit loop's setter would keep it True; this clears its children too
    log.info("resuming after the end of epoch %d", loop.epoch_progress.current.processed - 1)


class EpochEndLast(ModelCheckpoint):
    """``last.ckpt`` at every epoch's end. ``ModelCheckpoint(save_last=True)`` writes it only at a step where it
    also wrote a top-k checkpoint, so at an epoch's end only when the monitored metric improved (and with
    ``save_top_k=0`` never). This one has no top-k files: when its epoch-end save is due it only says so, and the
    base class then writes ``last.ckpt`` (once)."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_epochs=every_n_epochs,
                         enable_version_counter=False)

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        self._last_global_step_saved = trainer.global_step  # "a checkpoint is written at this step": last.ckpt


_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
stop_signal: int | None = None  # the signal that stopped the last fit of this process (main() reads it)


class SigtermCheckpoint(Callback):
    """``<dirpath>/<filename>.ckpt`` when the run stops for SIGTERM or SIGINT (Ctrl-C).

    Lightning stops after the current batch on SIGTERM (``trainer.received_sigterm`` → ``SIGTERMException``), but on
    SIGINT it raises ``KeyboardInterrupt`` wherever the signal lands (mid-step: between the optimizer step and the EMA
    update, say) and saves nothing. While the fit runs, a first SIGINT here takes the SIGTERM path (a second one
    interrupts at once). Other exceptions can strike mid-step, so they save nothing (the last step checkpoint stays
    the resume point). Not Lightning's ``OnExceptionCheckpoint``: with one of those, every ``fit`` without a
    ckpt_path silently resumes from ``last`` of its directory."""

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.ckpt_path = os.path.join(dirpath, filename + ".ckpt")
        self._previous_sigint: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        global stop_signal
        stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum: int, frame: Any) -> None:
            global stop_signal
            if stop_signal == signal.SIGINT:  # Ctrl-C twice: stop now (a SIGTERM before it does not count)
                raise KeyboardInterrupt
            stop_signal = signal.SIGINT
            log.warning("SIGINT: stopping after the current batch (Ctrl-C again to stop at once, saving nothing)")
            trainer._signal_connector.received_sigterm = True  # what Lightning's own SIGTERM handler sets

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        global stop_signal
        if isinstance(exception, SIGTERMException):
            stop_signal = stop_signal or signal.SIGTERM
            trainer.save_checkpoint(self.ckpt_path)
            log.warning("%s: saved %s at step %d", _SIGNALS[stop_signal], self.ckpt_path, trainer.global_step)
