"""A training DataLoader that resumes mid-epoch.

Lightning saves ``state_dict()`` of every train loader that has one into each checkpoint (``fit_loop`` →
``CombinedLoader._state_dicts``) and calls ``load_state_dict()`` before it iterates again on resume. The state is
(sampler epoch, batches handed out this epoch); after a load, the next iteration of that same epoch skips those
batches in the *batch sampler* (indices only: nothing is read or decoded), so the run continues with the batch an
uninterrupted run would have seen next. The samplers must be deterministic given ``(seed, epoch)``:
``DistributedSampler`` (also used for one process) and :class:`~clipdiff.data.sampler.DistinctCaptionBatchSampler`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler


class SkipBatches(Sampler[list[int]]):
    """Wraps a batch sampler; its next iteration skips the first ``skip`` batches (then ``skip`` returns to 0)."""

    def __init__(self, batch_sampler: Any):
        self.batch_sampler = batch_sampler
        # Lightning calls set_epoch on ``loader.batch_sampler.sampler``: point it at whatever is epoch-seeded
        self.sampler = batch_sampler if hasattr(batch_sampler, "set_epoch") else getattr(batch_sampler, "sampler", None)
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batch_sampler), skip, None)


class ResumableLoader(DataLoader):
    """``DataLoader(dataset, batch_sampler=…)`` with ``state_dict`` / ``load_state_dict`` for mid-epoch resume."""

    def __init__(self, dataset: Any, batch_sampler: Any, **kwargs: Any):
        super().__init__(dataset, batch_sampler=SkipBatches(batch_sampler), **kwargs)
        self._served = 0  # batches handed out in the current epoch
        self._resume: dict[str, int] | None = None

    @property
    def epoch(self) -> int:
        return int(getattr(self.batch_sampler.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        # a generator: it starts at the first next(), after Lightning's set_epoch for this epoch
        resume, self._resume = self._resume, None
        same_epoch = resume is not None and resume["epoch"] == self.epoch and resume["batches"] < len(self)
        self.batch_sampler.skip = self._served = resume["batches"] if same_epoch else 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        if hasattr(self.batch_sampler.sampler, "set_epoch"):
            self.batch_sampler.sampler.set_epoch(self._resume["epoch"])
