"""Label one object folder from its views: look (segment, classify pixels, measure), then decide a caption.

:func:`analyse_object` reads at most ``views`` evenly spaced views of one object folder (images, and poses when
present) and returns the evidence: colour counts per band, the body-type feature vector and flags for bad
input. It never raises on bad images. :func:`decide` turns evidence into a caption with a cost over candidate
captions (colour fit + body-type log-likelihood + a weak caption prior), restricted to the 43 captions of the
original labels or free (any grammatical caption), and a confidence in [0, 1].
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipdiff.data.srn import IMAGE_SUFFIXES, load_image, read_intrinsics, read_pose, select_views
from clipdiff.data.vocab import BODY_TYPES, COLOURS, caption_prior, make_caption, parse_caption
from clipdiff.errors import ClipdiffError
from clipdiff.labeling import body as body_mod
from clipdiff.labeling.colour import ColourEvidence, ColourRules, car_mask, classify_pixels, colour_costs

BLANK_PIXELS = 0.0005  # a view whose car covers less than this share of the image is blank


@dataclass
class Analysis:
    """What the views of one object show (picklable: it travels back from worker processes)."""

    object_id: str
    views_found: int = 0
    views_used: int = 0
    blank: int = 0
    unreadable: int = 0
    no_pose: int = 0  # usable views without a camera pose (or intrinsics): they do not count for the body type
    evidence: ColourEvidence = field(default_factory=ColourEvidence)
    features: np.ndarray | None = None
    used_paths: list[str] = field(default_factory=list)

    @property
    def flags(self) -> list[str]:
        out = []
        if self.views_found == 0:
            out.append("no_images")
        if self.blank:
            out.append(f"blank:{self.blank}")
        if self.unreadable:
            out.append(f"unreadable:{self.unreadable}")
        if self.no_pose:
            out.append(f"no_pose:{self.no_pose}")
        return out


def list_views(obj_dir: Path) -> list[Path]:
    rgb = obj_dir / "rgb"
    return sorted(p for p in rgb.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if rgb.is_dir() else []


def _camera(obj_dir: Path, view: Path, image: np.ndarray, intrinsics: dict | None) -> body_mod.Camera | None:
    pose_file = obj_dir / "pose" / f"{view.stem}.txt"
    if intrinsics is None or not pose_file.is_file():
        return None
    try:
        pose = read_pose(pose_file)
    except (ClipdiffError, ValueError, OSError):
        return None
    h, w = image.shape[:2]
    sx, sy = w / intrinsics["width"], h / intrinsics["height"]
    return body_mod.Camera(pose, intrinsics["focal"] * sx, intrinsics["cx"] * sx, intrinsics["cy"] * sy)


def analyse_object(obj_dir: str | Path, views: int | None = 8) -> Analysis:
    """Evidence from at most ``views`` evenly spaced views of one object folder; never raises on bad input."""
    obj_dir = Path(obj_dir)
    out = Analysis(obj_dir.name)
    all_views = list_views(obj_dir)
    out.views_found = len(all_views)
    if not all_views:
        return out
    intrinsics = None
    if (obj_dir / "intrinsics.txt").is_file():
        try:
            intrinsics = read_intrinsics(obj_dir / "intrinsics.txt")
        except (ClipdiffError, OSError):
            intrinsics = None
    classes, masks, cams = [], [], []
    for view in select_views(all_views, views):
        try:
            rgb = load_image(view)
        except ClipdiffError:
            out.unreadable += 1
            continue
        mask = car_mask(rgb)
        if mask.mean() < BLANK_PIXELS:
            out.blank += 1
            continue
        cls = classify_pixels(rgb, mask)
        out.evidence.add(rgb, cls)
        out.used_paths.append(str(view))
        cam = _camera(obj_dir, view, rgb, intrinsics)
        if cam is not None:
            classes.append(cls)
            masks.append(mask)
            cams.append(cam)
    out.views_used = len(out.used_paths)
    out.no_pose = out.views_used - len(cams)
    if cams:
        out.features = body_mod.body_features(classes, cams, masks)
    return out


# ---------------------------------------------------------------------------------------------------------
# Deciding a caption


@dataclass
class Decision:
    caption: str
    confidence: float
    colours: tuple[str, ...]
    body_type: str
    colour_confidence: float
    type_confidence: float
    free_caption: str  # the best caption over the whole grammar (what the restricted caption was mapped from)
    cost: float
    alternatives: list[tuple[str, float]]  # next best captions with their probabilities


@dataclass
class DecisionConfig:
    """Weights of the caption cost (see :func:`decide`)."""

    type_weight: float = 0.15  # × −log p(type | features) (a class-balanced model)
    type_prior_weight: float = 0.25  # × type_weight × −log p(type) (body-type shares of the original captions)
    prior_weight: float = 0.0  # × −log p(caption) under the original caption counts (+1 smoothing)
    temperature: float = 0.08  # confidence = softmax(−cost / temperature) over the candidates


def all_colourings() -> list[tuple[str, ...]]:
    return [(c,) for c in COLOURS] + [p for p in itertools.permutations(COLOURS, 2)]


def _prior_logp(captions: list[str]) -> np.ndarray:
    prior = caption_prior()
    counts = np.array([prior.get(c, 0) + 1.0 for c in captions])
    return np.log(counts / counts.sum())


class Decider:
    """Scores candidate captions; built once per run (the candidate set depends on the vocabulary mode)."""

    def __init__(self, vocabulary: str = "restricted", model: body_mod.BodyModel | None = None,
                 config: DecisionConfig | None = None, rules: ColourRules | None = None):
        if vocabulary not in ("restricted", "free"):
            raise ClipdiffError(f"vocabulary={vocabulary!r} must be 'restricted' (the 43 original captions) or 'free'")
        self.vocabulary = vocabulary
        self.model = model or body_mod.load_body_model()
        self.config = config or DecisionConfig()
        self.rules = rules or ColourRules()
        self.free = [make_caption(c, t) for c in all_colourings() for t in BODY_TYPES]
        self.free_parsed = [(tuple(c), t) for c in all_colourings() for t in BODY_TYPES]
        if vocabulary == "restricted":
            self.captions = list(caption_prior())
            self.parsed = [(parse_caption(c).colours, parse_caption(c).body_type) for c in self.captions]
        else:
            self.captions, self.parsed = self.free, self.free_parsed
        counts = {t: 1.0 for t in BODY_TYPES}
        for cap, n in caption_prior().items():
            counts[parse_caption(cap).body_type] += n
        total = sum(counts.values())
        self.type_prior = np.log(np.array([counts[t] / total for t in BODY_TYPES]))
        self.prior_free = _prior_logp(self.free)
        self.prior = _prior_logp(self.captions)
        self.fallback = max(caption_prior().items(), key=lambda kv: kv[1])[0]

    def type_logp(self, features: np.ndarray | None) -> np.ndarray:
        if features is None:
            return self.type_prior.copy()
        lp = self.model.log_probs(features)
        lp = np.array([lp[self.model.classes.index(t)] for t in BODY_TYPES]) + self.config.type_prior_weight * self.type_prior
        return lp - np.log(np.exp(lp - lp.max()).sum()) - lp.max()

    def _costs(self, parsed, prior, colour_cost, type_lp) -> np.ndarray:
        cfg = self.config
        out = np.array([colour_cost[t][tuple(c)] - cfg.type_weight * type_lp[BODY_TYPES.index(t)] for c, t in parsed])
        return out - cfg.prior_weight * prior

    def decide(self, analysis: Analysis) -> Decision:
        if analysis.views_used == 0:
            colours = parse_caption(self.fallback)
            return Decision(self.fallback, 0.0, colours.colours, colours.body_type, 0.0, 0.0, self.fallback,
                            math.inf, [])
        colour_cost = {t: colour_costs(analysis.evidence, t, self.rules) for t in BODY_TYPES}
        type_lp = self.type_logp(analysis.features)
        cost = self._costs(self.parsed, self.prior, colour_cost, type_lp)
        free_cost = self._costs(self.free_parsed, self.prior_free, colour_cost, type_lp)
        p = np.exp(-(cost - cost.min()) / self.config.temperature)
        p /= p.sum()
        order = np.argsort(cost)
        best = int(order[0])
        colours, body_type = self.parsed[best]
        # marginal confidences: share of the probability mass that agrees on the colours / on the type
        colour_conf = float(sum(p[i] for i, (c, _) in enumerate(self.parsed) if c == colours))
        type_conf = float(sum(p[i] for i, (_, t) in enumerate(self.parsed) if t == body_type))
        return Decision(
            caption=self.captions[best], confidence=float(p[best]), colours=tuple(colours), body_type=body_type,
            colour_confidence=colour_conf, type_confidence=type_conf,
            free_caption=self.free[int(np.argmin(free_cost))], cost=float(cost[best]),
            alternatives=[(self.captions[int(i)], float(p[i])) for i in order[1:3]],
        )
