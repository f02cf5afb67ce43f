"""``CarsDataModule``: the one LightningDataModule shared by the CLIP, noisy-CLIP, DDPM and judge models.

A batch is a dict::

    image    uint8 [B, 3, H, W] in 0..255 from the loaders; float32 in [0, 1] once on the training device
    caption  int64 [B]  caption id in :attr:`CarsDataModule.vocab` (absent when the captions are not read:
                     :meth:`CarsDataModule.without_captions`, for models that do not use them)
    object   int64 [B]  object index within the split
    view     int64 [B]  view index within the object's (selected) views
    pose     float32 [B, 3]  unit camera direction (:mod:`clipdiff.data.poses`): only when poses are requested
                     (``data.poses=true``, or a model calling :meth:`CarsDataModule.request_poses` in its ``setup``)

The loaders hand out uint8 (a quarter of the bytes to gather, pin and copy to a GPU);
:meth:`CarsDataModule.on_after_batch_transfer` makes the images float on the device, so every model's step sees
float32 in [0, 1] and does its own normalisation. Code that reads the loaders or datasets without a Trainer converts
with :func:`float_images`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, default_collate

from clipdiff.data.cache import PackedImages
from clipdiff.data.captions import load_split_labels
from clipdiff.data.poses import camera_directions, load_matrices
from clipdiff.data.resumable import ResumableLoader
from clipdiff.data.sampler import DistinctCaptionBatchSampler
from clipdiff.data.srn import SrnObject, ViewPaths, check_root, load_image, scan_split
from clipdiff.data.vocab import Vocabulary
from clipdiff.errors import ClipdiffError
from clipdiff.utils.checks import count
from clipdiff.utils.images import float_images

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")


@dataclass
class SplitIndex:
    """Flat per-image index of one split."""

    name: str
    objects: list[SrnObject]
    captions: list[str] | None  # per object (None: captions not read)
    paths: ViewPaths  # per image (a Sequence[Path])
    object_index: np.ndarray  # per image
    view_index: np.ndarray  # per image

    @classmethod
    def build(cls, name: str, objects: list[SrnObject], captions: dict[str, str] | None) -> SplitIndex:
        counts = np.asarray([len(o.view_names) for o in objects], dtype=np.int64)
        first = np.repeat(np.cumsum(counts) - counts, counts)  # each image's object's first row
        return cls(name, objects, None if captions is None else [captions[o.object_id] for o in objects],
                   ViewPaths(objects), np.repeat(np.arange(len(objects), dtype=np.int64), counts),
                   np.arange(int(counts.sum()), dtype=np.int64) - first)


class CarsImages(Dataset):
    """Images of one split, read from the packed cache (default) or decoded from the PNG files."""

    def __init__(self, index: SplitIndex, vocab: Vocabulary | None, image_size: int, cache_dir: str | Path | None,
                 progress: bool = True):
        self.index = index
        self.image_size = image_size
        self.object_caption = (None if index.captions is None or vocab is None else
                               np.asarray([vocab.index(c) for c in index.captions], dtype=np.int64))
        self.packed = None
        keep = np.arange(len(index.paths))
        if cache_dir is not None:
            self.packed = PackedImages(index.paths, image_size, cache_dir, name=index.name, progress=progress)
            keep = np.flatnonzero(self.packed.valid)
        self.rows = keep
        # None when the captions were not read (batches then carry no ``caption``)
        self.caption_ids = None if self.object_caption is None else self.object_caption[index.object_index[keep]]
        self.poses: np.ndarray | None = None  # float32 [N paths, 3] unit camera directions, once loaded

    def load_poses(self, cache_dir: str | Path | None) -> None:
        """Read the camera poses of every view once (cached beside the images when ``cache_dir`` is given);
        from then on every item carries ``pose``. A missing or corrupt pose file is one ClipdiffError naming it."""
        if self.poses is None:
            matrices = load_matrices(self.index.paths, cache_dir, self.index.name)
            self.poses = camera_directions(matrices).numpy()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.__getitems__([i])
        return {k: v[0] if k in ("image", "pose") else int(v[0]) for k, v in item.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once (the DataLoader calls this): uint8 CHW images, one read per image from the cache."""
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        if self.packed is not None:
            arr = self.packed.gather(rows)
        else:
            arr = np.stack([load_image(self.index.paths[r], self.image_size).transpose(2, 0, 1) for r in rows])
        batch = {"image": torch.from_numpy(arr)}
        if self.caption_ids is not None:
            batch["caption"] = torch.from_numpy(self.caption_ids[idx])
        batch |= {"object": torch.from_numpy(self.index.object_index[rows]),
                  "view": torch.from_numpy(self.index.view_index[rows])}
        if self.poses is not None:
            batch["pose"] = torch.from_numpy(self.poses[rows])
        return batch

    def float_images(self, indices) -> torch.Tensor:
        """Images at ``indices`` as float32 [N, 3, H, W] in [0, 1] (for code that reads the dataset directly)."""
        return float_images(self.__getitems__([int(i) for i in indices])["image"])


def collate(batch: dict[str, torch.Tensor] | list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batches from :meth:`CarsImages.__getitems__` are already collated; anything else goes the default way."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class CarsDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        captions: str | None = None,
        splits: dict[str, str] | None = None,
        image_size: int = 32,
        views_per_object: int | None = None,
        eval_views_per_object: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        sampler: str = "random",
        cache: bool = True,
        cache_dir: str | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        progress: bool = True,
        poses: bool = False,
    ):
        super().__init__()
        for key, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                                ("num_workers", num_workers, 0), ("seed", seed, None)):
            count(value, f"data.{key}", minimum=low)
        for key, value in (("eval_batch_size", eval_batch_size), ("views_per_object", views_per_object),
                           ("eval_views_per_object", eval_views_per_object)):
            count(value, f"data.{key}", optional=True)
        self.save_hyperparameters(logger=False)
        if sampler not in ("random", "distinct_caption"):
            raise ClipdiffError(f"data.sampler={sampler!r}: choose 'random' or 'distinct_caption'")
        self.splits = dict(splits or {"train": "cars_train", "val": "cars_val", "test": "cars_test"})
        unknown = set(self.splits) - set(STAGES)
        if unknown:
            raise ClipdiffError(f"data.splits has unknown stage(s) {sorted(unknown)}; use train, val, test")
        self.captions_path = captions if captions is not None else str(Path(root) / "cars_text")
        self.vocab: Vocabulary | None = None
        self.indices: dict[str, SplitIndex] = {}
        self.datasets: dict[str, CarsImages] = {}
        self.poses = bool(poses)
        self.read_captions = True

    def without_captions(self) -> None:
        """Do not read the label files (a model that does not use captions, e.g. the unconditional DDPM, calls this
        through ``clipdiff.train`` before anything is indexed): batches carry no ``caption`` and :attr:`vocab` stays
        None, so such a model trains on a root without ``cars_text``. The images and their order are unchanged.
        With ``data.sampler=distinct_caption`` the captions are still read: the sampler balances the batches by
        caption (a lever for the unconditional DDPM too), and the model ignores them."""
        if self.indices:
            raise RuntimeError("without_captions() must be called before the data is indexed")
        self.read_captions = self.hparams.sampler == "distinct_caption"

    def request_poses(self) -> None:
        """From now on every batch of every split carries ``pose`` (a model that needs camera poses calls this in its
        ``setup``; other models' batches stay as they are). Datasets already built read their poses now."""
        self.poses = True
        for ds in self.datasets.values():
            ds.load_poses(self._cache_dir())

    def _cache_dir(self) -> str | None:
        hp = self.hparams
        return (hp.cache_dir or str(Path(hp.root) / ".cache")) if hp.cache else None

    # -- indexing ----------------------------------------------------------------------------------------------
    def index(self) -> dict[str, SplitIndex]:
        """Scan the split folders and join their labels (cheap; memoised)."""
        if not self.indices:
            hp = self.hparams
            root = check_root(hp.root)
            objects = {}
            for stage, split in self.splits.items():
                views = hp.views_per_object if stage == "train" else (hp.eval_views_per_object or hp.views_per_object)
                objects[stage] = scan_split(root, split, views)
            if not self.read_captions:
                log.info("the captions are not read: this model does not use them")
                self.indices = {s: SplitIndex.build(self.splits[s], objs, None) for s, objs in objects.items()}
                return self.indices
            labels = load_split_labels(
                self.captions_path, {self.splits[s]: [o.object_id for o in objs] for s, objs in objects.items()}
            )
            self.vocab = Vocabulary(c for table in labels.values() for c in table.values())
            self.indices = {s: SplitIndex.build(self.splits[s], objs, labels[self.splits[s]]) for s, objs in objects.items()}
        return self.indices

    def _dataset(self, stage: str) -> CarsImages:
        if stage not in self.datasets:
            idx = self.index()
            if stage not in idx:
                raise ClipdiffError(f"data.splits has no '{stage}' split (have: {', '.join(idx)})")
            hp = self.hparams
            ds = CarsImages(idx[stage], self.vocab, hp.image_size, self._cache_dir(), progress=hp.progress)
            if self.poses:
                ds.load_poses(self._cache_dir())
            self.datasets[stage] = ds
        return self.datasets[stage]

    def prepare_data(self) -> None:
        for stage in self.splits:
            self._dataset(stage)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for s in wanted.get(stage, tuple(self.splits)) if stage else tuple(self.splits):
            if s in self.splits:
                self._dataset(s)

    # -- loaders -----------------------------------------------------------------------------------------------
    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _loader(self, ds: Dataset, loader_cls: type[DataLoader] = DataLoader, **kw) -> DataLoader:
        hp = self.hparams
        return loader_cls(ds, num_workers=hp.num_workers, pin_memory=hp.pin_memory, collate_fn=collate,
                          persistent_workers=hp.num_workers > 0, **kw)

    def train_dataloader(self) -> DataLoader:
        """Resumable mid-epoch (:mod:`clipdiff.data.resumable`). Shuffling is seeded by ``(seed, epoch)`` and
        the same for any world size: rank r takes every world-th image (``random``) or batch
        (``distinct_caption``) of one global order, so ranks see disjoint shares of what one process would see."""
        ds, hp = self._dataset("train"), self.hparams
        world, rank = self._dist()
        if hp.sampler == "distinct_caption":
            batches = DistinctCaptionBatchSampler(ds.caption_ids, hp.batch_size, world, rank, hp.seed)
        else:
            sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=hp.seed, drop_last=True)
            batches = BatchSampler(sampler, hp.batch_size, drop_last=len(ds) >= hp.batch_size * world)
        return self._loader(ds, batch_sampler=batches, loader_cls=ResumableLoader)

    def _eval_loader(self, stage: str) -> DataLoader:
        ds, hp = self._dataset(stage), self.hparams
        world, rank = self._dist()
        sampler = DistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None
        return self._loader(ds, sampler=sampler, batch_size=hp.eval_batch_size or hp.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Images become float32 in [0, 1] here, on the training device (Lightning calls this after the copy)."""
        if isinstance(batch, dict) and "image" in batch:
            batch = {**batch, "image": float_images(batch["image"])}
        return batch

    def caption_counts(self, num_classes: int, stage: str = "train") -> torch.Tensor:
        """Images per caption id in ``stage`` (int64 [num_classes]), e.g. for class weights or a caption prior."""
        ds = self._dataset(stage)
        if ds.caption_ids is None:
            raise ClipdiffError("caption counts asked of a DataModule that reads no captions (without_captions)")
        ids = torch.as_tensor(ds.caption_ids, dtype=torch.long)
        return torch.bincount(ids, minlength=num_classes)

    # -- reporting ---------------------------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """Objects, images and caption counts per split."""
        out: dict[str, Any] = {"vocabulary": len(self.vocab) if self.vocab else None}
        for stage, idx in self.index().items():
            counts = Counter(idx.captions or [])
            out[stage] = {"split": idx.name, "objects": len(idx.objects), "images": len(idx.paths),
                          "captions": dict(counts.most_common())}
        out["vocabulary"] = len(self.vocab) if self.vocab else None
        return out
