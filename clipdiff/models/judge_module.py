"""``JudgeModule``: trains the independent judge (:class:`~clipdiff.models.components.judge.Judge`) with
cross-entropy on the caption ids of the shared DataModule. ``python -m clipdiff.train model=judge``.

Logged: ``train/loss``, ``val/loss``, ``val/acc_caption`` (micro), ``val/acc_caption_macro`` (mean recall over the
captions present), ``val/acc_colour``, ``val/acc_type`` (colour part / body type of the predicted caption vs the
true one), and the same under ``test/``. ``export(path)`` writes the Lightning-free ``export.pt`` that
:func:`~clipdiff.models.components.judge.load_judge` reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from clipdiff.errors import ClipdiffError
from clipdiff.models.components.judge import Judge, JudgeAugment, accuracies_from_confusion, caption_parts
from clipdiff.models.export import save_export

CLASS_WEIGHTING = ("none", "inverse_sqrt")


class JudgeModule(L.LightningModule):
    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        net: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
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
            raise ClipdiffError(f"model.class_weighting={class_weighting!r}: choose one of {', '.join(CLASS_WEIGHTING)}")
        self.save_hyperparameters(logger=False)
        self.vocabulary = list(vocabulary)
        self.net = Judge(num_classes=len(self.vocabulary), **(net or {}))
        self.augment = JudgeAugment(**augment) if augment else None
        colour_of, type_of = caption_parts(self.vocabulary)
        self.register_buffer("colour_of", colour_of, persistent=False)
        self.register_buffer("type_of", type_of, persistent=False)
        # set from the training captions in setup("fit"); saved in checkpoints so a reload scores the same loss
        self.register_buffer("class_weight", torch.ones(len(self.vocabulary)))
        k = len(self.vocabulary)
        self.val_confusion = MulticlassConfusionMatrix(num_classes=k)
        self.test_confusion = MulticlassConfusionMatrix(num_classes=k)

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.hparams.class_weighting == "none":
            return
        dm = getattr(self.trainer, "datamodule", None)
        if not hasattr(dm, "caption_counts"):
            raise ClipdiffError("model.class_weighting needs the training captions of CarsDataModule; "
                                "set model.class_weighting=none for another data source")
        counts = dm.caption_counts(len(self.vocabulary)).double()
        w = counts.clamp_min(1.0).rsqrt()
        w = w / ((w * counts).sum() / counts.sum())  # mean weight over training images = 1
        self.class_weight.copy_(w.float())

    # -- steps ---------------------------------------------------------------------------------------------------
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(x01)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weight if self.hparams.class_weighting != "none" else None
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["caption"]
        if self.augment is not None:
            x = self.augment(x)
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, confusion: MulticlassConfusionMatrix) -> None:
        x, y = batch["image"], batch["caption"]
        logits = self(x)
        self.log(f"{stage}/loss", self._loss(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        confusion.update(logits.argmax(dim=1), y)

    def _eval_epoch_end(self, stage: str, confusion: MulticlassConfusionMatrix) -> None:
        accs = accuracies_from_confusion(confusion.compute(), self.colour_of, self.type_of)
        confusion.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in accs.items()}, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_confusion)

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()  # fresh state: under ddp_spawn the initial metric tensors arrive in memory shared by both ranks

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_confusion)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_confusion)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_confusion)

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
        """The Lightning-free judge: config, weights, vocabulary and image size (see ``load_judge``)."""
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return save_export(path, "judge", config=dict(self.net.config), state_dict=state,
                           vocabulary=list(self.vocabulary), image_size=self.net.image_size)
