"""Held-out real renders for evaluation, from splits that no model trained on.

- :class:`Reference` — the real images of one SRN root's split at the DDPM's size: a caption's images spread
  over as many objects as there are, an unconditional draw (the unguided row's reference), and two halves split by
  object (the real-against-real floor of every realism measure).
- :func:`open_references` — ``(mix, by_caption)`` from the evaluation config: ``data.root``'s ``real_split`` (the
  unconditional mix) and ``real_root``'s (more held-out objects per caption; ``data.root`` when not given).
- :func:`judge_on_real` — the judge on held-out real renders of each caption (``judge_real.csv``): the ceiling of
  the samples' judged accuracy, with intervals over objects rather than views.
- :func:`choose_captions` — the captions to evaluate.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipdiff.data.vocab import caption_prior
from clipdiff.errors import ClipdiffError

log = logging.getLogger("clipdiff.evaluate")


class Reference:
    """Real images of ``split`` (a ``data.splits`` key) under ``root``, every view, resized to ``image_size``."""

    def __init__(self, data_cfg: DictConfig, image_size: int, split: str, root: str | None = None,
                 captions: str | None = None):
        splits = dict(data_cfg.splits)
        if split not in splits:
            raise ClipdiffError(f"real_split={split}: data.splits has no such split (have: {', '.join(splits)})")
        node = {**OmegaConf.to_container(data_cfg, resolve=True), "splits": {split: splits[split]},
                "image_size": image_size, "progress": False, "views_per_object": None, "eval_views_per_object": None}
        if root is not None:
            node["root"] = str(root)
            node["captions"] = str(captions) if captions else _label_file(Path(root))
        self.root, self.split = Path(node["root"]), split
        self.dm = instantiate(node, _convert_="all")
        self.ds = self.dm._dataset(split)
        self.objects_of_row = torch.from_numpy(self.ds.index.object_index[self.ds.rows])
        self.captions_of_row = [self.dm.vocab.captions[i] for i in self.ds.caption_ids]
        self.name = f"`{self.root}` {self.ds.index.name}"

    def __len__(self) -> int:
        return len(self.ds)

    def _spread(self, rows: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """Up to ``k`` of ``rows``, one view of each object in a seeded random order before a second view of any."""
        gen = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        objects = self.objects_of_row[rows]
        rank = torch.zeros(len(rows), dtype=torch.long)  # how many views of the same object come before this one
        seen: Counter = Counter()
        for i, o in enumerate(objects.tolist()):
            rank[i], seen[o] = seen[o], seen[o] + 1
        return rows[torch.argsort(rank, stable=True)][:k]

    def caption_rows(self, caption: str) -> torch.Tensor:
        return torch.tensor([i for i, c in enumerate(self.captions_of_row) if c == caption], dtype=torch.long)

    def of(self, caption: str, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, object ids) of up to ``k`` views of ``caption``, spread over its objects; None without any."""
        rows = self.caption_rows(caption)
        if len(rows) == 0:
            return None
        rows = self._spread(rows, k, seed)
        return self.ds.float_images(rows), self.objects_of_row[rows]

    def matched(self, captions: list[str], k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, object ids): ``k`` real images of each caption, captions in order (None when a caption has
        fewer than ``k``)."""
        parts = [self.of(c, k, seed) for c in captions]
        if any(p is None or len(p[0]) < k for p in parts):
            return None
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def images(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ds.float_images(rows), self.objects_of_row[rows]

    def mix(self, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, object ids): ``k`` images drawn from the whole split (the captions as they come), spread over
        its objects."""
        return self.images(self._spread(torch.arange(len(self.ds)), k, seed))

    def halves(self, k: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        """Two (images, object ids) of up to ``k`` images from disjoint halves of the objects: what a perfect
        sampler scores against the real images (the floor of every realism measure). None with fewer than 4
        objects."""
        objects = self.objects_of_row.unique()
        if len(objects) < 4:
            return None
        order = objects[torch.randperm(len(objects), generator=torch.Generator().manual_seed(seed))]
        first = torch.isin(self.objects_of_row, order[: len(order) // 2])
        rows = torch.arange(len(self.ds))
        a, b = self._spread(rows[first], k, seed), self._spread(rows[~first], k, seed + 1)
        n = min(len(a), len(b))
        return self.images(a[:n]), self.images(b[:n])


def _label_file(root: Path) -> str:
    for candidate in (root / "ground_truth.tsv", root / "cars_text"):
        if candidate.exists():
            return str(candidate)
    raise ClipdiffError(f"real_root={root} has neither ground_truth.tsv nor cars_text/: give real_captions=FILE")


def open_references(cfg: DictConfig, image_size: int) -> tuple[Reference | None, Reference | None]:
    """(the unconditional mix: data.root's real_split, the per-caption reference: real_root's real_split); both None
    without data.root, and the per-caption one is the mix itself without real_root."""
    root = Path(str(cfg.data.root))
    if not root.is_dir():
        log.warning("data.root=%s does not exist: no realism measures and no ceiling (give data.root=…)", root)
        return None, None
    split = str(cfg.real_split)
    folder = root / str(dict(cfg.data.splits).get(split, ""))
    if split in cfg.data.splits and (folder == root or not folder.is_dir()):
        log.warning("real_split=%s: no split folder %s, so no realism measures and no ceiling on held-out real "
                    "renders (give a held-out split: real_split=…)", split, folder)
        return None, None
    mix = Reference(cfg.data, image_size, split)
    if not cfg.get("real_root"):
        return mix, mix
    real_root = Path(str(cfg.real_root))
    if not real_root.is_dir():
        raise ClipdiffError(f"real_root={real_root} does not exist: render it (make demo's `heldout` stage) or drop it")
    return mix, Reference(cfg.data, image_size, split, real_root, cfg.get("real_captions"))


def train_caption_counts(cfg: DictConfig) -> Counter:
    """How many training objects each caption has in data.root (the labels the models trained on)."""
    node = {**OmegaConf.to_container(cfg.data, resolve=True), "progress": False,
            "splits": {"train": dict(cfg.data.splits)["train"]}}
    index = instantiate(node, _convert_="all").index()["train"]
    return Counter(index.captions)


def judge_on_real(judge, real: Reference, captions: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    """The judge on up to ``n`` held-out real images of each caption, spread over its objects: what a sampler that
    drew real renders would score, the ceiling for the samples' judged accuracy. Intervals are over objects (views
    of one object are alike). The last row (``caption`` "all") pools every caption's images."""
    from clipdiff.eval import report

    rows, per_caption = [], []
    for caption in captions:
        got = real.of(caption, n, seed)
        row = {"caption": caption, "split": real.name, "n": 0 if got is None else len(got[0]),
               "objects": 0 if got is None else len(got[1].unique())}
        if got is not None:
            hits = judge.correct(got[0], torch.full((len(got[0]),), judge.vocabulary.index(caption)))
            per_caption.append((hits, got[1]))
            row |= report.cluster_accuracy_columns([(hits, got[1])])
        rows.append(row)
    if per_caption:
        rows.append({"caption": "all", "split": real.name, "n": sum(r["n"] for r in rows),
                     "objects": sum(r["objects"] for r in rows),
                     **report.cluster_accuracy_columns(per_caption)})
    return rows


def choose_captions(cfg: DictConfig, counts: Counter | None, judge_vocab: list[str]) -> tuple[list[str], str]:
    if cfg.captions:
        captions, source = [str(c) for c in cfg.captions], "given"
    elif counts:
        captions = [c for c, _ in counts.most_common() if c in judge_vocab][: int(cfg.num_captions)]
        source = "the most frequent training labels"
    else:
        captions = [c for c in caption_prior() if c in judge_vocab][: int(cfg.num_captions)]
        source = "the most frequent of the reference caption prior (no data.root)"
    unknown = [c for c in captions if c not in judge_vocab]
    if unknown:
        raise ClipdiffError(f"captions {unknown} are not in the judge's vocabulary of {len(judge_vocab)} captions: "
                            f"the judge could not score them")
    if not captions:
        raise ClipdiffError("no captions to evaluate (captions=[…] or a dataset with training labels)")
    return list(dict.fromkeys(captions)), source
