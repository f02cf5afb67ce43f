"""``JudgeModule``: trains the independent judge (:class:`~clipdiff.models.components.judge.Judge`) on the shared
DataModule: ``python -m clipdiff.train model=judge``. The colour-blind type net learns the body type and the colour
net the colour part of each image's caption (a cross-entropy each, summed).

After every validation (and at the end of fitting, for weights no validation saw) it sets the refusal rule for the
current weights: a bank of score features of ``refusal.bank_size`` evenly spaced training images (drawn through the
training augmentation when ``refusal.bank_augment``) and the threshold at the ``refusal.quantile`` of the
car-render scores of the val split (real renders it does not train on). Checkpoints carry the rule
(``judge_calibration``), so the exported best epoch has its own.

With ``outliers`` set, a share of each training batch is replaced by synthetic non-renders (tile-shuffled and
half-and-half mixed renders, :mod:`~clipdiff.models.components.judge_outliers`) on which the type net is taught
to be unsure (outlier exposure, Hendrycks et al., 2019), so their features move away from real renders'.

Logged: ``train/loss`` (and ``train/loss_type``, ``train/loss_colour``, ``train/loss_outlier``), ``val/loss``,
``val/acc_caption`` (colour and type right, micro), ``val/acc_caption_macro`` (mean recall over the captions
present), ``val/acc_colour``, ``val/acc_type``, ``val/threshold`` (the car-render threshold), and the same under
``test/`` with ``test/refused`` (the share of held-out test renders the rule refuses; the accuracies are the raw
ones). ``export(path)`` writes the Lightning-free ``export.pt`` that
:func:`~clipdiff.models.components.judge.load_judge` reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import CatMetric

from clipdiff.errors import ClipdiffError
from clipdiff.models.components.judge import Judge, JudgeAugment, part_accuracies
from clipdiff.models.components.judge_outliers import KINDS, make_outliers, uniform_cross_entropy

CLASS_WEIGHTING = ("none", "inverse_sqrt")
REFUSAL = {"k": 5, "bank_size": 2048, "quantile": 0.05, "score_stages": [-1], "bank_augment": False}
OUTLIERS = {"share": 0.25, "weight": 0.5, "kinds": list(KINDS), "tiles": 4}
CALIBRATION_KEY = "judge_calibration"


def inverse_sqrt_weights(counts: torch.Tensor) -> torch.Tensor:
    """Weights 1/sqrt(count) per class, scaled so the mean weight over the counted images is 1."""
    counts = counts.double()
    w = counts.clamp_min(1.0).rsqrt()
    return (w / ((w * counts).sum() / counts.sum())).float()


class JudgeModule(L.LightningModule):
    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        image_size: int = 32,
        type_net: dict[str, Any] | None = None,
        colour_net: dict[str, Any] | None = None,
        refusal: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        outliers: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        class_weighting: str = "none",
        vocabulary: list[str] | None = None,
        monitor: dict | None = None,  # {metric, mode}: what the checkpoint callbacks call best (kept in hparams)
    ):
        super().__init__()
        if not vocabulary:
            raise ClipdiffError("the judge needs the caption vocabulary (train it with `python -m clipdiff.train "
                                "model=judge`, which passes the DataModule's captions)")
        if class_weighting not in CLASS_WEIGHTING:
            raise ClipdiffError(f"model.class_weighting={class_weighting!r}: choose one of "
                                f"{', '.join(CLASS_WEIGHTING)}")
        unknown = set(refusal or {}) - set(REFUSAL)
        if unknown:
            raise ClipdiffError(f"model.refusal has unknown key(s) {sorted(unknown)}: use {', '.join(REFUSAL)}")
        self.refusal = {**REFUSAL, **(refusal or {})}
        if not 0.0 <= float(self.refusal["quantile"]) < 1.0 or int(self.refusal["bank_size"]) < 1:
            raise ClipdiffError(f"model.refusal={self.refusal}: quantile in [0, 1) and bank_size >= 1")
        self.outliers = self._outlier_settings(outliers, image_size)
        self.save_hyperparameters(logger=False)
        self.vocabulary = list(vocabulary)
        self.net = Judge(self.vocabulary, image_size=image_size, type_net=type_net, colour_net=colour_net,
                         k=int(self.refusal["k"]), score_stages=list(self.refusal["score_stages"]))
        self.augment = JudgeAugment(**augment) if augment else None
        # set from the training captions in setup("fit"); saved in checkpoints so a reload scores the same loss
        self.register_buffer("type_weight", torch.ones(len(self.net.type_names)))
        self.register_buffer("colour_weight", torch.ones(len(self.net.colour_names)))
        self.val_hits = CatMetric()  # rows (target caption id, colour hit, type hit)
        self.test_hits = CatMetric()
        self.test_scores = CatMetric()
        self.calibrated_step = -1

    @staticmethod
    def _outlier_settings(outliers: dict[str, Any] | None, image_size: int) -> dict[str, Any] | None:
        if not outliers:
            return None
        unknown = set(outliers) - set(OUTLIERS)
        if unknown:
            raise ClipdiffError(f"model.outliers has unknown key(s) {sorted(unknown)}: use {', '.join(OUTLIERS)}")
        out = {**OUTLIERS, **outliers}
        bad_kinds = [k for k in out["kinds"] if k not in KINDS]
        if bad_kinds or not out["kinds"] or not 0.0 < float(out["share"]) < 1.0 or float(out["weight"]) < 0:
            raise ClipdiffError(f"model.outliers={out}: kinds from {', '.join(KINDS)}, share in (0, 1), weight >= 0 "
                                "(model.outliers=null turns outlier exposure off)")
        if "shuffle" in out["kinds"] and image_size % int(out["tiles"]):
            raise ClipdiffError(f"model.outliers.tiles={out['tiles']} does not divide the {image_size} px images")
        return out

    # -- setup ---------------------------------------------------------------------------------------------------
    def _datasets(self) -> dict:
        dm = getattr(self.trainer, "datamodule", None)
        datasets = getattr(dm, "datasets", None)
        if not isinstance(datasets, dict):
            raise ClipdiffError("the judge reads its refusal bank and threshold from CarsDataModule's train and val "
                                "splits; train it with `python -m clipdiff.train model=judge`")
        return datasets

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm = getattr(self.trainer, "datamodule", None)
        if "val" not in getattr(dm, "splits", {}):
            raise ClipdiffError("the judge sets its refusal threshold on held-out real renders: data.splits needs a "
                                "val split")
        if self.hparams.class_weighting == "none":
            return
        if not hasattr(dm, "caption_counts"):
            raise ClipdiffError("model.class_weighting needs the training captions of CarsDataModule; "
                                "set model.class_weighting=none for another data source")
        per_caption = dm.caption_counts(len(self.vocabulary)).double()
        for weight, part_of in ((self.type_weight, self.net.type_of), (self.colour_weight, self.net.colour_of)):
            counts = torch.zeros(len(weight), dtype=torch.float64).index_add_(0, part_of.cpu(), per_caption)
            weight.copy_(inverse_sqrt_weights(counts))

    # -- steps ---------------------------------------------------------------------------------------------------
    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(type logits, colour logits)."""
        return self.net.type_net(x01), self.net.colour_net(x01)

    def _losses(self, type_logits, colour_logits, captions) -> tuple[torch.Tensor, torch.Tensor]:
        weighted = self.hparams.class_weighting != "none"
        ls = self.hparams.label_smoothing
        return (F.cross_entropy(type_logits, self.net.type_of[captions], label_smoothing=ls,
                                weight=self.type_weight if weighted else None),
                F.cross_entropy(colour_logits, self.net.colour_of[captions], label_smoothing=ls,
                                weight=self.colour_weight if weighted else None))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["caption"]
        if self.augment is not None:
            x = self.augment(x)
        n_out = int(self.outliers["share"] * len(y)) if self.outliers else 0
        if n_out == 0:
            type_logits, colour_logits = self(x)
            loss_type, loss_colour = self._losses(type_logits, colour_logits, y)
            loss_outlier = torch.zeros((), device=x.device)
        else:  # the first n_out images (the batch is shuffled) become synthetic negatives for outlier exposure
            negatives = make_outliers(x[:n_out], self.outliers["kinds"], int(self.outliers["tiles"]))
            x, y = x[n_out:], y[n_out:]
            all_type = self.net.type_net(torch.cat([x, negatives]))
            loss_type, loss_colour = self._losses(all_type[: len(y)], self.net.colour_net(x), y)
            loss_outlier = uniform_cross_entropy(all_type[len(y):])
        weight = float(self.outliers["weight"]) if self.outliers else 0.0
        loss = loss_type + loss_colour + weight * loss_outlier
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        self.log_dict({"train/loss_type": loss_type, "train/loss_colour": loss_colour,
                       "train/loss_outlier": loss_outlier}, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, hits: CatMetric) -> torch.Tensor:
        """Logs the loss, gathers the hits; returns the score's features (:meth:`Judge.embed`)."""
        x, y = batch["image"], batch["caption"]
        stages = self.net.type_net.stage_features(x)
        type_logits, colour_logits = self.net.type_net.head(stages[-1]), self.net.colour_net(x)
        loss_type, loss_colour = self._losses(type_logits, colour_logits, y)
        self.log(f"{stage}/loss", loss_type + loss_colour, on_epoch=True, batch_size=len(y), sync_dist=True)
        colour_hit = colour_logits.argmax(1) == self.net.colour_of[y]
        type_hit = type_logits.argmax(1) == self.net.type_of[y]
        hits.update(torch.stack([y, colour_hit.long(), type_hit.long()], dim=1))
        return self.net._embed(stages)

    def _eval_epoch_end(self, stage: str, hits: CatMetric) -> None:
        rows = hits.compute().long().view(-1, 3)
        hits.reset()
        accs = part_accuracies(rows[:, 0], rows[:, 1].bool(), rows[:, 2].bool(), len(self.vocabulary))
        self.log_dict({f"{stage}/{k}": v for k, v in accs.items()}, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_hits)

    def on_validation_epoch_start(self) -> None:
        self.val_hits.reset()  # fresh state: under ddp_spawn the initial metric tensors arrive in shared memory

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_hits)
        if not self.trainer.sanity_checking:
            self.calibrate()
            self.log("val/threshold", float(self.net.threshold))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        features = self._eval_step(batch, "test", self.test_hits)
        if self.net.calibrated:
            self.test_scores.update(self.net.score(features))

    def on_test_epoch_start(self) -> None:
        self.test_hits.reset()
        self.test_scores.reset()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_hits)
        if self.net.calibrated:
            scores = self.test_scores.compute()
            self.log("test/refused", (~(scores >= self.net.threshold)).float().mean())
        self.test_scores.reset()

    # -- the refusal rule ----------------------------------------------------------------------------------------
    def _features(self, dataset, indices: np.ndarray, augment: bool = False, batch_size: int = 256) -> torch.Tensor:
        """:meth:`Judge.embed` of ``dataset`` images at ``indices``; with ``augment``, each drawn once through the
        training augmentation from a fixed seed (the global random streams are left as they were)."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        out = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            for chunk in np.array_split(indices, max(1, -(-len(indices) // batch_size))):
                x = dataset.float_images(chunk).to(self.device)
                if augment and self.augment is not None:
                    x = self.augment(x)
                out.append(self.net.embed(x))
        return torch.cat(out)

    def calibrate(self) -> torch.Tensor:
        """The refusal rule for the current weights: the bank from ``refusal.bank_size`` evenly spaced training
        images (all views of an object are adjacent, so this spreads over objects and views), drawn through the
        training augmentation when ``refusal.bank_augment`` (the blur, noise, zoom and shifts the judge learns to
        accept), and the threshold from every val image as it is. Returns the val scores. Deterministic, so every
        rank computes the same rule."""
        datasets = self._datasets()
        train, val = datasets.get("train"), datasets.get("val")
        if train is None or val is None or not len(train) or not len(val):
            raise ClipdiffError("the judge sets its refusal rule on the train (bank) and val (threshold) splits: "
                                "both need images")
        bank_idx = np.unique(np.linspace(0, len(train) - 1, min(int(self.refusal["bank_size"]), len(train))).round()
                             .astype(np.int64))
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: they outlive the validation loop
                bank = self._features(train, bank_idx, augment=bool(self.refusal["bank_augment"]))
                heldout = self._features(val, np.arange(len(val)))
                scores = self.net.calibrate(bank, heldout, float(self.refusal["quantile"]), split="val",
                                            step=int(self.global_step))
        finally:
            self.train(was_training)
        self.calibrated_step = int(self.global_step)
        return scores

    def on_fit_end(self) -> None:
        if self.calibrated_step != self.global_step:  # stopped where no validation ran (max_steps mid-epoch)
            self.calibrate()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.net.calibrated:
            checkpoint[CALIBRATION_KEY] = {**self.net.calibration_state(), "calibrated_step": self.calibrated_step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CALIBRATION_KEY)
        if state is not None:
            self.net.load_calibration({k: v for k, v in state.items() if k != "calibrated_step"})
            self.calibrated_step = int(state.get("calibrated_step", -1))

    # -- optimisation --------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """AdamW partial over two groups (no decay on norms and biases); a per-step schedule over all steps."""
        decay, rest = [], []
        for p in self.net.parameters():
            (decay if p.ndim > 1 else rest).append(p)
        opt = self.hparams.optimizer(params=[{"params": decay}, {"params": rest, "weight_decay": 0.0}])
        scheduler = self.hparams.scheduler
        if scheduler is None:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        params = inspect.signature(getattr(scheduler, "func", scheduler)).parameters
        length = next((n for n in ("total_steps", "T_max", "total_iters") if n in params), None)
        sched = scheduler(opt, **({length: total} if length else {}))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """The Lightning-free judge: config, weights, vocabulary, image size and refusal rule (see ``load_judge``)."""
        return self.net.export(path)
