"""Callbacks the scale-out tests add to real runs (``+callbacks.<name>._target_=scaleout_helpers.…``); importable
from subprocesses and spawned DDP workers (tests/ is on their path)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class HoldAt(Callback):
    """After optimizer step ``step``: write ``marker`` and wait until SIGTERM (or SIGKILL) arrives."""

    def __init__(self, step: int, marker: str, timeout_s: float = 120.0):
        self.step, self.marker, self.timeout_s = step, marker, timeout_s

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class RecordBatches(Callback):
    """Each rank appends ``[stage, step, rank, [[object, view], …]]`` of its training and validation batches to
    ``<folder>/rank<r>.jsonl``."""

    def __init__(self, folder: str):
        self.folder = folder

    def _record(self, stage: str, trainer, batch) -> None:
        pairs = [[int(o), int(v)] for o, v in zip(batch["object"], batch["view"])]
        path = Path(self.folder) / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps([stage, trainer.global_step, trainer.global_rank, pairs]) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record("train", trainer, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("val", trainer, batch)


class HoldingStepCheckpoint(ModelCheckpoint):
    """The step checkpoint (``callbacks.step_checkpoint._target_=scaleout_helpers.HoldingStepCheckpoint``) that,
    when ``CLIPDIFF_TEST_HOLD_STEP`` is set, holds after that optimizer step like :class:`HoldAt` (writing the
    file ``CLIPDIFF_TEST_HOLD_MARKER``): a pipeline stage's arguments stay the same with and without the hold."""

    def on_train_batch_end(self, trainer, *args) -> None:
        super().on_train_batch_end(trainer, *args)
        step = os.environ.get("CLIPDIFF_TEST_HOLD_STEP")
        if step is not None:
            HoldAt(int(step), os.environ["CLIPDIFF_TEST_HOLD_MARKER"]).on_train_batch_end(trainer)
