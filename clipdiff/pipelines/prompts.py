"""Prompts → caption ids of a guide: one per sample, matched to the guide's vocabulary after normalising case and
whitespace ("A  red Car" is "a red car"); text outside the vocabulary becomes an extra caption embedded by the
guide's text tower (``free_text: warn``) or is refused. Empty prompts, and free text longer than the text tower's
context (open_clip would cut it silently), are refused naming the prompt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from clipdiff.errors import ClipdiffError

log = logging.getLogger(__name__)


def normalise(text: str) -> str:
    """Lower case, single spaces, no leading/trailing blanks (the captions of the vocabulary are written so)."""
    return " ".join(str(text).split()).lower()


def per_sample(prompts: str | Sequence[str] | None, num_samples: int | None) -> list[str] | None:
    """One prompt per sample: a string is repeated ``num_samples`` times; a list must have that many (when given)."""
    if prompts is None:
        return None
    if isinstance(prompts, str):
        if num_samples is None:
            raise ClipdiffError("one prompt for several samples: give num_samples (or one prompt per sample)")
        return [prompts] * int(num_samples)
    prompts = [str(p) for p in prompts]
    if num_samples is not None and len(prompts) != int(num_samples):
        raise ClipdiffError(f"got {len(prompts)} prompts for {num_samples} samples (give one, or one per sample)")
    return prompts


def tokens_needed(tokenizer: Any, text: str) -> tuple[int, int] | None:
    """(tokens the text needs with its start/end tokens, the tokenizer's context length), or None if unknown."""
    encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or not context:
        return None
    return len(encode(text)) + 2, int(context)


def resolve(prompts: list[str] | None, vocabulary: Sequence[str], *, what: str, free_text: str = "warn",
            tokenizer: Any = None, prefix: str = "guidance") -> tuple[list[str], torch.Tensor, list[str]]:
    """(each sample's caption as matched, its id into ``vocabulary + extra``, the ``extra`` free-text prompts).

    ``free_text``: ``warn`` (append with a warning), ``error``, or ``unsupported`` (the guide has no text tower)."""
    vocabulary = list(vocabulary)
    if not prompts:
        raise ClipdiffError(f"guidance needs a target: set prompt=\"{vocabulary[0] if vocabulary else 'a red car'}\" "
                            f"(one of the {what}'s {len(vocabulary)} captions)")
    lookup = {normalise(c): c for c in vocabulary}
    matched, extra = [], []
    for raw in prompts:
        text = normalise(raw)
        if not text:
            raise ClipdiffError(f"prompt {raw!r} is empty: give a caption such as {vocabulary[0]!r}")
        if text in lookup:
            matched.append(lookup[text])
            continue
        matched.append(text)
        if text in extra:
            continue
        if free_text != "warn":
            why = ("it has no text tower to embed free text" if free_text == "unsupported"
                   else f"{prefix}.free_text=error")
            raise ClipdiffError(
                f"prompt {raw!r} is not in the {what}'s vocabulary of {len(vocabulary)} captions (e.g. "
                f"{', '.join(repr(v) for v in vocabulary[:3])}) and {why}; use a caption of the vocabulary")
        need = tokens_needed(tokenizer, text)
        if need is not None and need[0] > need[1]:
            raise ClipdiffError(f"prompt {raw!r} needs {need[0]} tokens but the {what}'s text tower reads "
                                f"{need[1]}: it would be cut; shorten it")
        log.warning("prompt %r is not in the %s's vocabulary: guiding with its free-text embedding, appended "
                    "to the %d captions (classifier form: scored against them)", text, what, len(vocabulary))
        extra.append(text)
    index = {c: i for i, c in enumerate(vocabulary + extra)}
    return matched, torch.tensor([index[c] for c in matched], dtype=torch.long), extra
