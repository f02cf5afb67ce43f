"""Caption grammar and the caption vocabulary.

Captions follow the original hand labels: ``"a {colour} {type}"`` or ``"a {colour} and {colour} {type}"``.
The embedded ``caption_counts.tsv`` (also at the repository's ``cars_text/``) holds the 43 captions of the
original 2151 ShapeNet labels with their object counts; it is the prior of the procedural set.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

from clipdiff.errors import ClipdiffError

COLOURS: tuple[str, ...] = ("white", "gray", "black", "red", "blue", "green", "yellow")
BODY_TYPES: tuple[str, ...] = ("car", "jeep/bus", "van", "truck", "sports car", "open car")


@dataclass(frozen=True)
class Caption:
    """A parsed caption: one or two body colours and a body type."""

    colours: tuple[str, ...]
    body_type: str

    @property
    def colour(self) -> str:
        """The colour part as written in the caption ("white" or "white and red")."""
        return " and ".join(self.colours)

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.body_type}"


def parse_caption(text: str) -> Caption:
    """Parse ``"a red car"`` / ``"a white and red jeep/bus"``; raise ClipdiffError on anything else."""
    words = text.strip()
    if not words.startswith("a "):
        raise ClipdiffError(f"caption {text!r} does not start with 'a ': expected 'a <colour> [and <colour>] <type>'")
    rest = words[2:]
    body = next((t for t in sorted(BODY_TYPES, key=len, reverse=True) if rest.endswith(" " + t)), None)
    if body is None:
        raise ClipdiffError(f"caption {text!r} names no known body type (known: {', '.join(BODY_TYPES)})")
    colour_part = rest[: -len(body) - 1].strip()
    colours = tuple(c.strip() for c in colour_part.split(" and "))
    unknown = [c for c in colours if c not in COLOURS]
    if unknown or not 1 <= len(colours) <= 2:
        raise ClipdiffError(f"caption {text!r} has unknown colour(s) {unknown or colours} (known: {', '.join(COLOURS)})")
    return Caption(colours, body)


def make_caption(colours: Sequence[str], body_type: str) -> str:
    return Caption(tuple(colours), body_type).text


def caption_prior() -> dict[str, int]:
    """The 43 captions of the original hand labels with their object counts (most frequent first)."""
    ref = resources.files("clipdiff.data").joinpath("caption_counts.tsv")
    with ref.open("r", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["caption"]: int(r["objects"]) for r in rows}


class Vocabulary:
    """Caption <-> id mapping. Ids follow sorted caption order, so they do not depend on file or folder order.

    The vocabulary is derived from label files (see :mod:`clipdiff.data.captions`) and stored inside every
    checkpoint so that a model's logits can always be read back as captions.
    """

    def __init__(self, captions: Iterable[str]):
        self.captions: list[str] = sorted(set(captions))
        if not self.captions:
            raise ClipdiffError("the caption vocabulary is empty: no label file provided any caption")
        self._index = {c: i for i, c in enumerate(self.captions)}
        self.parsed: list[Caption] = [parse_caption(c) for c in self.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, caption: str) -> bool:
        return caption in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.captions == self.captions

    def index(self, caption: str) -> int:
        try:
            return self._index[caption]
        except KeyError:
            raise ClipdiffError(
                f"caption {caption!r} is not in the vocabulary of {len(self)} captions "
                f"(e.g. {', '.join(repr(c) for c in self.captions[:3])})"
            ) from None

    def colour_ids(self) -> list[int]:
        """For each caption id, the id of its colour part in :meth:`colour_names`."""
        names = self.colour_names()
        return [names.index(p.colour) for p in self.parsed]

    def type_ids(self) -> list[int]:
        names = self.type_names()
        return [names.index(p.body_type) for p in self.parsed]

    def colour_names(self) -> list[str]:
        return sorted({p.colour for p in self.parsed})

    def type_names(self) -> list[str]:
        return sorted({p.body_type for p in self.parsed})

    def to_list(self) -> list[str]:
        return list(self.captions)
