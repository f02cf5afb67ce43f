"""Realism of a set of images against held-out real renders, by measures that no guide shares.

:class:`RealismMeasures` gives, for samples against real images: the two-sample classifier test in colour and in
grey (:func:`clipdiff.eval.c2st.c2st`, the mean accuracy of ``repeats`` runs with fresh folds and nets, with the
mean of their Wilson intervals; 0.5 = indistinguishable), and FD, KID and
improved precision/recall (:func:`clipdiff.eval.manifold.precision_recall`) in the realism net's feature space.
``floor`` is real against real (disjoint objects), ``distortion_check`` the sanity check of the measure itself.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from clipdiff.errors import ClipdiffError
from clipdiff.eval.c2st import c2st_repeats
from clipdiff.eval.fid import fd_kid
from clipdiff.eval.manifold import precision_recall

NAN = math.nan
log = logging.getLogger("clipdiff.evaluate")


class RealismMeasures:
    """``measures(fake, real) -> {c2st_rgb(_lo/_hi), c2st_grey(_lo/_hi), fd_indep, kid_indep, precision, recall}``;
    without a realism feature space (``space`` None) the last four are NaN."""

    def __init__(self, space, folds: int = 5, repeats: int = 3, seed: int = 0, device: str | torch.device = "cpu"):
        self.space, self.folds, self.repeats, self.seed, self.device = space, int(folds), int(repeats), int(seed), device
        self.name = space.name if space is not None else "no realism net (realism_ckpt=null)"

    @staticmethod
    def empty() -> dict[str, float]:
        return {k: NAN for k in ("c2st_rgb", "c2st_rgb_lo", "c2st_rgb_hi", "c2st_grey", "c2st_grey_lo",
                                 "c2st_grey_hi", "fd_indep", "kid_indep", "precision", "recall")}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.space(b.to(self.device)).double().cpu() for b in x.split(256)])

    def in_space(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
        """FD, KID and precision/recall in the realism space (NaN without one)."""
        if self.space is None:
            return {"fd_indep": NAN, "kid_indep": NAN, "precision": NAN, "recall": NAN}
        fid = fd_kid(fake, real, self.space, seed=self.seed, device=self.device)
        try:
            pr = precision_recall(self.features(real), self.features(fake))
        except ClipdiffError as e:  # fewer images than k-NN radii need: no precision/recall for this row
            log.warning("precision/recall left empty: %s", e)
            pr = {"precision": NAN, "recall": NAN}
        return {"fd_indep": fid["fd"], "kid_indep": fid["kid"], "precision": pr["precision"], "recall": pr["recall"]}

    def __call__(self, fake: torch.Tensor, real: tuple[torch.Tensor, torch.Tensor],
                 fake_groups: torch.Tensor | None = None) -> dict[str, float]:
        """``real``: (images, object ids): views of one object stay in one fold of the two-sample test, and its
        interval is over objects. ``fake_groups``: the same for ``fake`` when it is real too (the floor)."""
        real, groups = real
        out = self.empty()
        for mode, grey in (("rgb", False), ("grey", True)):
            try:
                r = c2st_repeats(fake, real, repeats=self.repeats, groups_a=fake_groups, groups_b=groups, grey=grey,
                                 folds=self.folds, seed=self.seed, device=self.device)
            except ClipdiffError as e:  # too few images or objects for the folds: no test, said once per row
                log.warning("c2st_%s left empty: %s", mode, e)
                continue
            # the mean over repeats (fresh folds and nets: one run moves by about ±0.05), with the mean of the
            # runs' own intervals (Wilson over held-out predictions, over objects for real renders)
            lo, hi = (sum(run[k] for run in r["runs"]) / len(r["runs"]) for k in ("lo", "hi"))
            out |= {f"c2st_{mode}": r["acc"], f"c2st_{mode}_lo": lo, f"c2st_{mode}_hi": hi}
        return out | self.in_space(fake, real)

    def floor(self, reference, k: int, seed: int) -> dict[str, Any] | None:
        """Real against real: two halves of the reference's objects (what a perfect sampler would score)."""
        halves = reference.halves(k, seed)
        if halves is None:
            return None
        (a, groups_a), b = halves
        return {"n": len(a), **self(a, b, fake_groups=groups_a)}

    def distortion_check(self, reference, seed: int, k: int = 512) -> tuple[list[dict[str, Any]], list[str]]:
        """(rows, failures): FD/KID of held-out real renders under each distortion at graded strengths against
        other held-out renders (disjoint objects), :func:`clipdiff.eval.realism.sanity_check`; ([], []) without a
        realism space or enough objects."""
        from clipdiff.eval.realism import check_failures, sanity_check

        halves = reference.halves(k, seed) if self.space is not None else None
        if halves is None:
            return [], []
        rows = sanity_check(self.space, halves[0][0], halves[1][0], seed=seed)
        return ([{"distortion": r["distortion"], "strength": r["strength"], "fd_indep": r["fd"], "kid_indep": r["kid"]}
                 for r in rows], check_failures(rows))
