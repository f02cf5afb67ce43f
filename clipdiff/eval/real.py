"""Real images for evaluation: a caption's real renders (FD/KID's reference), the judge on held-out real renders
(the ceiling of judged accuracy, ``judge_real.csv``) and the captions to evaluate."""

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
from clipdiff.eval import report

log = logging.getLogger("clipdiff.evaluate")


class RealImages:
    """Real images of one caption from the dataset (``data`` config), at the DDPM's size; None when absent.

    ``split`` gives the images FD/KID compare against; ``extra`` names other stages read here (``judge_split``)."""

    def __init__(self, data_cfg: DictConfig, image_size: int, split: str, extra: dict[str, str] | None = None):
        splits = dict(data_cfg.splits)
        for key, stage in {"real_split": split, **(extra or {})}.items():
            if stage not in splits:
                raise ClipdiffError(f"{key}={stage}: data.splits has no such stage (have: {', '.join(splits)})")
        read = ("train", split, *(extra or {}).values())
        wanted = {s: splits[s] for s in splits if s in read}  # only the splits read here are scanned
        node = {**OmegaConf.to_container(data_cfg, resolve=True), "splits": wanted, "image_size": image_size,
                "progress": False}
        self.dm = instantiate(node, _convert_="all")
        self.split, self.extra = split, dict(extra or {})
        self.index = self.dm.index()

    def train_counts(self) -> Counter:
        return Counter(self.index["train" if "train" in self.index else self.split].captions)

    def rows(self, caption: str, limit: int, seed: int, split: str | None = None) -> torch.Tensor | None:
        """Up to ``limit`` dataset rows (images) of the caption, drawn with ``seed``; None when there are none."""
        if caption not in self.dm.vocab:
            return None
        ds = self.dm._dataset(split or self.split)
        rows = (torch.as_tensor(ds.caption_ids) == self.dm.vocab.index(caption)).nonzero().flatten()
        if len(rows) == 0:
            return None
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]].sort().values

    def objects(self, rows: torch.Tensor, split: str | None = None) -> int:
        """How many distinct objects the images at ``rows`` show."""
        ds = self.dm._dataset(split or self.split)
        return len(set(ds.index.object_index[ds.rows[rows.numpy()]].tolist()))

    def of(self, caption: str, limit: int, seed: int, split: str | None = None) -> torch.Tensor | None:
        rows = self.rows(caption, limit, seed, split)
        return None if rows is None else self.dm._dataset(split or self.split).float_images(rows)


def open_real(cfg: DictConfig, image_size: int) -> RealImages | None:
    root = Path(str(cfg.data.root))
    if not root.is_dir():
        log.warning("data.root=%s does not exist: no FD/KID (give data.root=… for real images)", root)
        return None
    extra = None
    if cfg.get("judge_split"):
        folder = root / str(dict(cfg.data.splits).get(str(cfg.judge_split), ""))
        if folder.is_dir() and folder != root:
            extra = {"judge_split": str(cfg.judge_split)}
        else:
            log.warning("judge_split=%s: no split folder %s, so the judge is not checked on held-out real images "
                        "(judge_split=null silences this)", cfg.judge_split, folder)
    return RealImages(cfg.data, image_size, str(cfg.real_split), extra)


def judge_on_real(judge, real: RealImages, captions: list[str], n: int, split: str, resamples: int,
                  seed: int) -> list[dict[str, Any]]:
    """The judge on up to ``n`` held-out real images of each caption (``split``, which it never trained on): what
    a sampler that drew real renders would score, the ceiling for the samples' judged accuracy. The last row
    (``caption`` "all") averages the captions that have images there, each weighing the same, as in the sample rows."""
    rows, hits_by_caption = [], {}
    for caption in captions:
        picked = real.rows(caption, n, seed, split=split)
        images = None if picked is None else real.dm._dataset(split).float_images(picked)
        row = {"caption": caption, "split": split, "n": 0 if images is None else len(images),
               "objects": 0 if picked is None else real.objects(picked, split)}  # the objects actually scored
        if images is not None:
            hits_by_caption[caption] = judge.correct(images, torch.full((len(images),), judge.vocabulary.index(caption)))
            row |= report.accuracy_columns(hits_by_caption[caption], resamples, seed)
        rows.append(row)
    if hits_by_caption:
        rows.append({"caption": "all", "split": split, "n": sum(r["n"] for r in rows),
                     "objects": sum(r["objects"] for r in rows),
                     **report.macro_accuracy_columns(list(hits_by_caption.values()), resamples, seed)})
    return rows


def choose_captions(cfg: DictConfig, real: RealImages | None, judge_vocab: list[str]) -> tuple[list[str], str]:
    if cfg.captions:
        captions, source = [str(c) for c in cfg.captions], "given"
    elif real is not None:
        counts = real.train_counts()
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
