"""What a resumed run needs beyond Lightning's own checkpoint contents (model, optimizer, schedulers, loops,
callbacks, the train loader's position — :mod:`clipdiff.data.resumable`):

- :class:`AtomicCheckpointIO`: Lightning writes a checkpoint to a temporary file in the *system* temp directory and
  moves it into place (a copy, not a rename, when that is another file system; no fsync). This plugin writes it
  beside the target, fsyncs and renames (``clipdiff.utils.io.atomic_open``): a crash never leaves a torn file.
- :class:`ExactResume`: every rank's global RNG states (torch, numpy, python) go into the checkpoint and come
  back before the first batch after the resume (the same noise, timesteps and flips as an uninterrupted run),
  and the train loader gets its saved position even where Lightning skips that.
- :class:`SigtermCheckpoint`: on SIGTERM Lightning stops at the end of the current batch (``SIGTERMException``);
  this callback then writes ``last.ckpt``, so ``ckpt_path=<run dir>`` continues from that very step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
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
      are put back just before the first training batch after the resume (not at load time: building the loader
      iterators after the load draws from the global RNG).
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
        loop = trainer.fit_loop
        pending = getattr(loop, "_combined_loader_states_to_load", None)
        if pending and getattr(loop, "_combined_loader", None) is not None:
            loop._combined_loader._load_state_dicts(pending)
            loop._combined_loader_states_to_load = []

    def on_train_batch_start(self, *args: Any) -> None:
        if self._rng is not None:
            _set_rng_states(self._rng)
            self._rng = None


class SigtermCheckpoint(Callback):
    """``<dirpath>/<filename>.ckpt`` when the run stops for SIGTERM. Other exceptions can strike mid-step, so they
    save nothing (the last step checkpoint stays the resume point). Not Lightning's ``OnExceptionCheckpoint``: with
    one of those, every ``fit`` without a ckpt_path silently resumes from ``last`` of its directory."""

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.ckpt_path = os.path.join(dirpath, filename + ".ckpt")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.ckpt_path)
            log.warning("SIGTERM: saved %s at step %d", self.ckpt_path, trainer.global_step)
