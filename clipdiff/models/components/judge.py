"""The judge: an independent reader of samples that names a colour and a body type, or refuses to.

It is never used for guidance. Plain ``nn.Module`` parts, free of Lightning:

- :class:`Judge` — two classifiers and a refusal rule, over the parts of the caption vocabulary
  (:class:`~clipdiff.data.vocab.Vocabulary`): a *type net* (:class:`SmallResNet` on the luminance only, so it is
  colour-blind) over the body types, a small *colour net* (RGB at a low resolution) over the colour parts, and an
  "is this a car render" *score*: the deep k-nearest-neighbour score (:mod:`~clipdiff.models.components.knn_score`,
  Sun et al., 2022) in the type net's normalised penultimate features against a bank of training renders. A sample
  scoring below the threshold — a low quantile of the scores of held-out real renders — is *refused* and counts
  as wrong for every part. ``predict`` gives the parts, the score and the decision; ``correct`` per-sample hits.
- :func:`load_judge` — the judge back from an ``export.pt`` (eval mode); an export of the old single caption
  classifier is refused with one line.
- :class:`JudgeAugment` — label-preserving training augmentation (crop/zoom/shift, mirror, optional blur and
  noise like DDPM samples; no colour changes: colour is the label).
- :func:`caption_parts` / :func:`part_accuracies` — colour and type read off caption ids, and accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdiff.data.vocab import Vocabulary
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.knn_score import knn_scores, refusal_threshold
from clipdiff.models.components.small_resnet import SmallResNet, luminance  # noqa: F401 (luminance: API)
from clipdiff.models.export import load_export, save_export

JUDGE_FORMAT = 2  # 1: one caption classifier without refusal (exports before this file's judge carry no field)


class Judge(nn.Module):
    """Colour net, colour-blind type net and car-render score over ``vocabulary`` (captions in id order).

    ``type_net`` / ``colour_net`` are :class:`SmallResNet` arguments (their ``image_size`` defaults to the judge's);
    ``k`` is the neighbour the score reads and ``score_stages`` the type-net stages (0-based) whose average-pooled
    outputs, each L2-normalised and joined, are the features it compares (:meth:`embed`; the last stage alone is
    Sun et al.'s penultimate layer; an earlier stage sees parts and texture, not only the outline). The score is
    undefined until :meth:`calibrate` gives it a bank of training features and held-out real features to set the
    threshold on (training does this; an export keeps it).
    """

    def __init__(self, vocabulary: Sequence[str], image_size: int = 32, type_net: Mapping[str, Any] | None = None,
                 colour_net: Mapping[str, Any] | None = None, k: int = 5,
                 score_stages: Sequence[int] | None = None):
        super().__init__()
        vocab = Vocabulary(vocabulary)
        if list(vocabulary) != vocab.captions:
            raise ClipdiffError("the judge needs its captions in id order (Vocabulary order: sorted, no repeats)")
        if int(k) < 1:
            raise ClipdiffError(f"model.refusal.k={k}: the score reads the k-th nearest neighbour, k >= 1")
        self.vocabulary: list[str] = vocab.to_list()
        self.colour_names, self.type_names = vocab.colour_names(), vocab.type_names()
        self.image_size, self.k = int(image_size), int(k)
        type_cfg = {"image_size": self.image_size, **(type_net or {})}
        colour_cfg = {"image_size": self.image_size, **(colour_net or {})}
        self.type_net = SmallResNet(len(self.type_names), in_channels=1, **type_cfg)
        self.colour_net = SmallResNet(len(self.colour_names), in_channels=3, **colour_cfg)
        n_stages = len(self.type_net.stages)
        self.score_stages = sorted({int(i) % n_stages for i in (score_stages if score_stages is not None else [-1])})
        if not self.score_stages or any(not -n_stages <= int(i) < n_stages for i in (score_stages or [])):
            raise ClipdiffError(f"model.refusal.score_stages={list(score_stages or [])}: type-net stages are 0.."
                                f"{n_stages - 1}")
        self.config = {"image_size": self.image_size, "type_net": type_cfg, "colour_net": colour_cfg, "k": self.k,
                       "score_stages": self.score_stages}
        colour_of, type_of = caption_parts(vocab)
        self.register_buffer("colour_of", colour_of, persistent=False)
        self.register_buffer("type_of", type_of, persistent=False)
        # the refusal rule (not in state_dict: its size is the bank's; checkpoints and exports carry it apart)
        dim = sum(self.type_net.config["widths"][i] for i in self.score_stages)
        self.register_buffer("bank", torch.zeros(0, dim), persistent=False)
        self.register_buffer("threshold", torch.tensor(math.nan), persistent=False)
        self.refusal: dict[str, Any] = {}

    # -- the refusal rule ----------------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return len(self.bank) > 0 and bool(torch.isfinite(self.threshold))

    def embed(self, x01: torch.Tensor) -> torch.Tensor:
        """The features the score compares: the chosen stages' pooled outputs, each L2-normalised, joined."""
        return self._embed(self.type_net.stage_features(x01))

    def _embed(self, stage_features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(stage_features[i], dim=1) for i in self.score_stages], dim=1)

    def score(self, embedded: torch.Tensor) -> torch.Tensor:
        """Car-render score [B] of :meth:`embed` features: minus the distance to the k-th nearest bank entry."""
        if not self.calibrated:
            raise ClipdiffError("this judge has no car-render threshold yet: it is set when training validates "
                                "(load a trained judge with load_judge(export.pt))")
        return knn_scores(embedded, self.bank, self.k)

    @torch.no_grad()
    def calibrate(self, bank_features: torch.Tensor, heldout_features: torch.Tensor, quantile: float,
                  split: str = "val", step: int | None = None) -> torch.Tensor:
        """Keep ``bank_features`` (:meth:`embed` of training images) and set the threshold to the ``quantile`` of the
        scores of ``heldout_features`` (real images the judge did not train on); returns those scores."""
        bank = F.normalize(bank_features.detach().float(), dim=1).to(self.threshold.device)
        scores = knn_scores(heldout_features.detach(), bank, self.k).cpu()
        self.bank = bank
        self.threshold = torch.tensor(refusal_threshold(scores, quantile), device=bank.device)
        self.refusal = {"quantile": float(quantile), "split": split, "heldout_scores": scores, "step": step}
        return scores

    def calibration_state(self) -> dict[str, Any]:
        return {"bank": self.bank.detach().cpu().clone(), "threshold": float(self.threshold), "k": self.k,
                **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.refusal.items()}}

    def load_calibration(self, state: Mapping[str, Any]) -> None:
        device = self.threshold.device
        self.bank = torch.as_tensor(state["bank"], dtype=torch.float32).to(device)
        self.threshold = torch.tensor(float(state["threshold"]), device=device)
        self.k = int(state.get("k", self.k))
        self.refusal = {k: v for k, v in state.items() if k not in ("bank", "threshold", "k")}

    # -- reading images ------------------------------------------------------------------------------------------
    def forward(self, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        """``colour`` / ``type`` logits over :attr:`colour_names` / :attr:`type_names` and the car-render ``score``."""
        stages = self.type_net.stage_features(x01)
        return {"colour": self.colour_net(x01), "type": self.type_net.head(stages[-1]),
                "score": self.score(self._embed(stages))}

    @torch.no_grad()
    def predict(self, x01: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per image (on the CPU): ``colour`` (id in :attr:`colour_names`), ``type`` (id in :attr:`type_names`),
        ``score`` (higher: more like a real render) and ``refused`` (score below the threshold, or not finite)."""
        device = self.threshold.device
        outs = [self(chunk.to(device)) for chunk in x01.split(batch_size)]
        if not outs:
            raise ClipdiffError("the judge was given no images")
        score = torch.cat([o["score"] for o in outs]).float().cpu()
        return {"colour": torch.cat([o["colour"].argmax(1) for o in outs]).cpu(),
                "type": torch.cat([o["type"].argmax(1) for o in outs]).cpu(),
                "score": score, "refused": ~(score >= float(self.threshold))}

    @torch.no_grad()
    def correct(self, x01: torch.Tensor, target: torch.Tensor | int, batch_size: int = 256,
                refuse: bool = True) -> dict[str, torch.Tensor]:
        """Per-sample hits (bool [B]) against target caption ids: ``colour`` and ``type`` (the parts named equal the
        target's), ``caption`` (both), and ``refused``. With ``refuse`` (default) a refused sample misses every
        part; ``refuse=False`` gives the raw hits (``refused`` is reported either way)."""
        pred = self.predict(x01, batch_size)
        target = torch.as_tensor(target).cpu().long().expand_as(pred["type"])
        if len(target) and not (0 <= int(target.min()) and int(target.max()) < len(self.vocabulary)):
            raise ClipdiffError(f"target caption ids must lie in 0..{len(self.vocabulary) - 1} (the judge's "
                                f"vocabulary), got {int(target.min())}..{int(target.max())}")
        colour = pred["colour"] == self.colour_of.cpu()[target]
        body = pred["type"] == self.type_of.cpu()[target]
        kept = ~pred["refused"] if refuse else torch.ones_like(body)
        return {"caption": colour & body & kept, "colour": colour & kept, "type": body & kept,
                "refused": pred["refused"]}

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """The Lightning-free judge (see :func:`load_judge`); it must be calibrated."""
        if not self.calibrated:
            raise ClipdiffError(f"cannot export the judge to {path}: it has no car-render threshold (set on the val "
                                "split when training validates: give data.splits a val split)")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return save_export(path, "judge", judge_format=JUDGE_FORMAT, config=dict(self.config), state_dict=state,
                           vocabulary=list(self.vocabulary), image_size=self.image_size,
                           calibration=self.calibration_state())


def load_judge(path: str | Path, key: str = "judge_ckpt", map_location: str | torch.device = "cpu") -> Judge:
    """The judge of an ``export.pt`` (or a run directory holding one), in eval mode.

    Any other file (missing, a Lightning checkpoint, another kind of model, a judge without refusal from an
    earlier clipdiff) fails with one ClipdiffError line naming ``key``.
    """
    obj = load_export(path, "judge", key=key)
    if obj.get("judge_format") != JUDGE_FORMAT or "calibration" not in obj:
        found = obj.get("judge_format", 1)
        raise ClipdiffError(
            f"{key}={path} is a judge of format {found} (this clipdiff reads {JUDGE_FORMAT}: colour net, grey type "
            f"net and a car-render threshold): retrain the judge with `python -m clipdiff.train model=judge …`")
    judge = Judge(obj["vocabulary"], **obj["config"])
    judge.load_state_dict(obj["state_dict"])
    judge.load_calibration(obj["calibration"])
    return judge.to(map_location).eval()


# -- colour / type parts of captions ----------------------------------------------------------------------------
def caption_parts(vocabulary: Sequence[str] | Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """For each caption id: the id of its colour part and of its body type (int64 [K] each)."""
    vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
    if not isinstance(vocabulary, Vocabulary) and list(vocabulary) != vocab.captions:
        raise ClipdiffError("caption_parts needs the captions in id order (Vocabulary order: sorted, no repeats)")
    return (torch.tensor(vocab.colour_ids(), dtype=torch.long), torch.tensor(vocab.type_ids(), dtype=torch.long))


def part_accuracies(target: torch.Tensor, colour_hit: torch.Tensor, type_hit: torch.Tensor,
                    num_captions: int) -> dict[str, torch.Tensor]:
    """Accuracies from per-sample hits: ``acc_caption`` (colour and type right; micro), ``acc_caption_macro`` (its
    mean recall over the target captions that occur — absent captions are left out rather than counted as 0),
    ``acc_colour`` and ``acc_type``."""
    target = target.long()
    caption = (colour_hit.bool() & type_hit.bool()).double()
    support = torch.bincount(target, minlength=num_captions).double()
    hits = torch.bincount(target, weights=caption, minlength=num_captions)
    present = support > 0
    n = max(len(target), 1)
    out = {
        "acc_caption": caption.sum() / n,
        "acc_caption_macro": (hits[present] / support[present]).mean() if present.any() else caption.new_zeros(()),
        "acc_colour": colour_hit.double().sum() / n,
        "acc_type": type_hit.double().sum() / n,
    }
    return {k: v.float() for k, v in out.items()}


# -- training augmentation --------------------------------------------------------------------------------------
def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-d Gaussian kernels [B, 2r+1]; sigma 0 gives the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


class JudgeAugment(nn.Module):
    """Label-preserving augmentation of a batch in [0, 1], one random draw per image, fully batched.

    - ``scale``: zoom range (side of the sampled window relative to the image; < 1 zooms in, a random resized
      crop of fixed aspect), ``translate``: shift range as a fraction of the image side, ``flip``: mirror left-right;
      one affine resample with edge-replicating borders.
    - ``blur_p`` / ``blur_sigma`` (pixels) and ``noise_p`` / ``noise_std``: Gaussian blur and additive Gaussian
      noise on a random share of the images, like the slightly soft, grainy samples of a small DDPM.
    Colour is never changed: it is half of the label.
    """

    def __init__(self, flip: bool = True, scale: Sequence[float] = (0.8, 1.0), translate: float = 0.08,
                 blur_p: float = 0.0, blur_sigma: Sequence[float] = (0.3, 1.0), noise_p: float = 0.0,
                 noise_std: Sequence[float] = (0.0, 0.05)):
        super().__init__()
        self.flip, self.scale, self.translate = bool(flip), tuple(scale), float(translate)
        self.blur_p, self.blur_sigma = float(blur_p), tuple(blur_sigma)
        self.noise_p, self.noise_std = float(noise_p), tuple(noise_std)

    def _uniform(self, n: int, lo_hi: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        lo, hi = lo_hi
        return torch.rand(n, device=like.device, dtype=like.dtype) * (hi - lo) + lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s = self._uniform(b, self.scale, x)
        sx = s * ((torch.rand(b, device=x.device) < 0.5).to(x.dtype) * -2 + 1) if self.flip else s
        t = self._uniform(2 * b, (-2 * self.translate, 2 * self.translate), x).view(b, 2)
        if self.scale != (1.0, 1.0) or self.translate > 0 or self.flip:
            theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
            theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = sx, s, t
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.blur_p > 0:
            sigma = self._uniform(b, self.blur_sigma, x) * (torch.rand(b, device=x.device) < self.blur_p)
            radius = max(1, round(2 * max(self.blur_sigma)))
            k = _gaussian_kernels(sigma, radius).repeat_interleave(x.shape[1], dim=0)  # [B*C, 2r+1]
            h, w = x.shape[-2:]
            y = F.pad(x.reshape(1, -1, h, w), (radius, radius, radius, radius), mode="replicate")
            y = F.conv2d(y, k[:, None, :, None], groups=k.shape[0])
            y = F.conv2d(y, k[:, None, None, :], groups=k.shape[0])
            x = y.view_as(x)
        if self.noise_p > 0:
            std = self._uniform(b, self.noise_std, x) * (torch.rand(b, device=x.device) < self.noise_p)
            x = x + std.view(b, 1, 1, 1) * torch.randn_like(x)
        return x.clamp(0.0, 1.0)
