"""Batch samplers.

:class:`DistinctCaptionBatchSampler` is the original project's trick for contrastive training: a batch never
holds two images with the same caption, so no in-batch negative is secretly a positive. Each batch draws
``batch_size`` distinct captions with probability proportional to how many images carry them, then takes the
next image of each caption from that caption's own shuffled queue; queues are reshuffled when used up, so
every image is visited. Under DDP every rank builds the same global sequence from ``(seed, epoch)`` and takes
every ``num_replicas``-th batch, so ranks see disjoint batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from clipdiff.errors import ClipdiffError


class DistinctCaptionBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        captions: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ):
        self.captions = np.asarray(captions)
        self.classes = np.unique(self.captions)
        if batch_size > len(self.classes):
            raise ClipdiffError(
                f"data.batch_size={batch_size} exceeds the {len(self.classes)} distinct captions of the training set; "
                f"a distinct-caption batch can hold at most one image per caption (lower the batch size or use data.sampler=random)"
            )
        self.batch_size = batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        total = batches_per_epoch or max(1, len(self.captions) // batch_size)
        self.batches_per_rank = max(1, total // num_replicas)
        self.epoch = 0
        self.members = [np.flatnonzero(self.captions == c) for c in self.classes]
        self.weights = np.array([len(m) for m in self.members], dtype=np.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = [rng.permutation(m) for m in self.members]
        pos = np.zeros(len(self.members), dtype=int)
        p = self.weights / self.weights.sum()
        for b in range(self.batches_per_rank * self.num_replicas):
            chosen = rng.choice(len(self.members), size=self.batch_size, replace=False, p=p)
            batch = []
            for k in chosen:
                if pos[k] == len(queues[k]):
                    queues[k], pos[k] = rng.permutation(self.members[k]), 0
                batch.append(int(queues[k][pos[k]]))
                pos[k] += 1
            if b % self.num_replicas == self.rank:
                yield batch
