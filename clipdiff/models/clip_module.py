"""``ClipModule``: contrastive CLIP training on the car captions (``python -m clipdiff.train model=clip``).

Training: label-aware symmetric contrastive loss (equal captions are never negatives; gathered over DDP
ranks), logit scale clamped to ``logit_scale_max``, AdamW without weight decay on norms/biases/logit scale,
warmup + cosine schedule, optional frozen text tower. ``label_aware=false`` with ``data.sampler=
distinct_caption`` is the original recipe (plain CLIP loss on batches without repeated captions).

Validation: zero-shot metrics over the caption vocabulary (:mod:`clipdiff.models.metrics.zeroshot`), logged as
``val/...``; each epoch's per-caption accuracy TSV and confusion-matrix PNG go to ``<run_dir>/zeroshot/``
(and to wandb when a WandbLogger is attached). :meth:`export` writes the Lightning-free ``export.pt`` that
:func:`clipdiff.models.components.clip.load_clip` reads.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from clipdiff.models.components.clip import ClipClassifier, create_clip, tokenizer_for
from clipdiff.models.components.losses import LabelAwareClipLoss, label_aware_clip_loss
from clipdiff.models.components.optim import build_optimizers
from clipdiff.models.metrics.zeroshot import ZeroShotMetrics

log = logging.getLogger(__name__)


class ClipModule(L.LightningModule):
    def __init__(
        self,
        vocabulary: list[str],
        model_name: str = "clipdiff-tiny-32",
        pretrained: str | None = None,
        image_size: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        freeze_text: bool = False,
        label_aware: bool = True,
        logit_scale_max: float = 100.0,
        hflip: bool = True,
        plot_every_n_epochs: int = 1,
        monitor: dict | None = None,  # {metric, mode}: what the checkpoint callbacks call best (kept in hparams)
    ):
        """``image_size`` overrides the architecture's input size (null: the config's); images of another
        size are resized to it. ``hflip`` flips half of each training batch (the captions do not depend on it)."""
        super().__init__()
        self.save_hyperparameters(logger=False)
        model, cfg, pp = create_clip(model_name, pretrained, image_size)
        size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
        self.clip = ClipClassifier(model, vocabulary, tokenizer_for(cfg, model_name), size, pp["mean"], pp["std"],
                                   model_cfg=cfg, model_name=model_name)
        if freeze_text:
            model.lock_text_tower()
        self.loss_fn = LabelAwareClipLoss(label_aware)
        self.val_metrics = ZeroShotMetrics(vocabulary, prefix="val/")
        self.test_metrics = ZeroShotMetrics(vocabulary, prefix="test/")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's loader, without re-reading ``pretrained`` (the weights come from the checkpoint)."""
        kwargs.setdefault("pretrained", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.loss_fn.rank, self.loss_fn.world_size = self.trainer.global_rank, self.trainer.world_size

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, V] caption logits with the current weights (no cached text features)."""
        return self.clip.logit_scale * self.clip.encode_image(x01) @ self.clip.encode_captions().T

    # -- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["caption"]
        if self.hparams.hflip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        image = self.clip.encode_image(x)
        ids, inverse = y.unique(return_inverse=True)  # encode each caption of the batch once
        text = self.clip.encode_captions(ids)[inverse]
        loss = self.loss_fn(image, text, self.clip.logit_scale, y)
        # every rank's loss covers its rows of the global batch: their mean is the global loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.log("train/logit_scale", self.clip.logit_scale.detach(), batch_size=len(y))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Clamp the logit scale right after each step (before the callbacks' batch-end hooks save checkpoints)."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.clip.model.logit_scale.clamp_(0, math.log(self.hparams.logit_scale_max))

    # -- evaluation --------------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: ZeroShotMetrics, stage: str) -> None:
        x, y = batch["image"], batch["caption"]
        image = self.clip.encode_image(x)
        text = self.clip.get_text_features()
        logits = self.clip.logit_scale * image @ text.T
        metrics.update(logits, y)
        loss = label_aware_clip_loss(image, text[y], self.clip.logit_scale, y)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(y))

    def _eval_epoch_end(self, metrics: ZeroShotMetrics) -> None:
        values = metrics.compute()
        self.log_dict(values)  # torchmetrics has already gathered every rank's states: equal on all ranks
        metrics.confusion()  # collective under DDP: every rank computes, rank 0 writes
        epoch = self.current_epoch
        every = max(1, self.hparams.plot_every_n_epochs)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and epoch % every == 0:
            stem = f"{metrics.prefix.rstrip('/')}_epoch{epoch:03d}"
            _, png = metrics.save(Path(self.trainer.default_root_dir) / "zeroshot", stem)
            for lg in self.loggers:
                if isinstance(lg, WandbLogger):
                    lg.log_image(key=f"{metrics.prefix}confusion", images=[str(png)], step=self.global_step)
            log.info("%s", "  ".join(f"{k}={v:.3f}" for k, v in values.items()))
        metrics.reset()

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()  # fresh state: under ddp_spawn the initial metric tensors arrive in memory shared by both ranks
        self.clip.refresh_text_features()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()  # fresh state: under ddp_spawn the initial metric tensors arrive in memory shared by both ranks
        self.clip.refresh_text_features()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics)

    # -- optimisation and export -------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.hparams.optimizer or functools.partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.1)
        return build_optimizers(self.clip.model, optimizer, self.hparams.scheduler,
                                int(self.trainer.estimated_stepping_batches))

    def export(self, path: str | Path) -> Path:
        """The Lightning-free artefact: open_clip config, weights, vocabulary, input size and normalisation."""
        return self.clip.export(path, trained_steps=int(self.global_step))
