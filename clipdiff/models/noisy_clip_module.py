"""``NoisyClipModule``: the timestep-aware CLIP guide (``python -m clipdiff.train model=noisy_clip``).

Initialised from a trained clean CLIP export (``model.init_from``; null = random init of ``model.model_name``, for
tests), it learns to read x_t of the DDPM's own noise schedule (the ``diffusion`` group, kept in the
hyperparameters, the checkpoint and the export).

Training: x_0 = the DataModule image scaled to [-1, 1] (half the batch flipped), t uniform over 0..T-1, x_t =
``add_noise(x_0, eps, t)``; loss = ``loss.contrastive`` × the label-aware CLIP loss of the clean CLIP step +
``loss.caption_ce`` × cross-entropy of the vocabulary logits (the guide is used classifier-style).

Validation: each val image noised once per timestep bucket with fixed noise (seeded per batch), so epochs compare;
top-1 accuracy and calibration error per bucket for this model (``val/acc_caption``, ``val/acc_t<lo>``,
``val/ece_t<lo>``, ``val/acc_upper``…) and for the frozen clean CLIP it started from on the same x_t, read as if it
were a clean image in [0, 1] (``val/clean_…``). Each epoch writes ``<run_dir>/noisy_eval/val_epochNNN_acc_vs_t``
(``.png`` and ``.tsv``), also sent to wandb when a WandbLogger is attached.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger

from clipdiff.diffusion.schedule import schedule_config, train_scheduler
from clipdiff.models.components.clip import ClipClassifier, create_clip, tokenizer_for
from clipdiff.models.components.losses import LabelAwareClipLoss
from clipdiff.models.components.noisy_clip import NoisyClipClassifier, clip_from_export, to_unit_range
from clipdiff.models.components.optim import build_optimizers
from clipdiff.models.export import load_export
from clipdiff.models.metrics.noisy import (
    TimestepBucketMetrics,
    fixed_noisy_batch,
    plot_accuracy_vs_t,
    write_bucket_table,
)

log = logging.getLogger(__name__)

DEFAULT_LOSS = {"contrastive": 1.0, "caption_ce": 1.0, "label_aware": True, "logit_adjust": 1.0}


def initial_clip(vocabulary: list[str], init_from: str | None, model_name: str, image_size: int | None) -> ClipClassifier:
    """The clean CLIP to start from: the ``init_from`` export over ``vocabulary``, or a random ``model_name``."""
    if init_from is not None:
        return clip_from_export(load_export(init_from, "clip", key="model.init_from"), vocabulary)
    model, cfg, pp = create_clip(model_name, None, image_size)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    return ClipClassifier(model, vocabulary, tokenizer_for(cfg, model_name), size, pp["mean"], pp["std"],
                          model_cfg=cfg, model_name=model_name)


class NoisyClipModule(L.LightningModule):
    def __init__(
        self,
        vocabulary: list[str],
        schedule: dict[str, Any],
        init_from: str | None = None,
        model_name: str = "clipdiff-tiny-32",
        image_size: int | None = None,
        embedding: dict[str, Any] | None = None,
        freeze_text: bool = True,
        loss: dict[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        logit_scale_max: float = 100.0,
        hflip: bool = True,
        num_buckets: int = 10,
        val_seed: int = 0,
        clean_reference: bool = True,
        plot_every_n_epochs: int = 1,
        monitor: dict | None = None,  # {metric, mode}: what the checkpoint callbacks call best (kept in hparams)
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.loss_weights = {**DEFAULT_LOSS, **(loss or {})}
        self.schedule = schedule_config(schedule)
        self.noise_scheduler = train_scheduler(self.schedule)
        self.num_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        clip = initial_clip(vocabulary, init_from, model_name, image_size)
        # the reference: the clean CLIP as it was before any noisy training (frozen; in the state dict so a
        # reloaded checkpoint keeps it even with random init)
        self.clean = copy.deepcopy(clip).eval().requires_grad_(False) if clean_reference else None
        self.guide = NoisyClipClassifier(clip.train().requires_grad_(True), self.schedule, embedding)
        if freeze_text:
            clip.model.lock_text_tower()
        self.loss_fn = LabelAwareClipLoss(bool(self.loss_weights["label_aware"]))
        k = len(vocabulary)
        self.val_metrics = TimestepBucketMetrics(k, self.num_timesteps, num_buckets, prefix="val/")
        self.test_metrics = TimestepBucketMetrics(k, self.num_timesteps, num_buckets, prefix="test/")
        if clean_reference:
            self.val_clean = TimestepBucketMetrics(k, self.num_timesteps, num_buckets, prefix="val/", name="clean_")
            self.test_clean = TimestepBucketMetrics(k, self.num_timesteps, num_buckets, prefix="test/", name="clean_")

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.loss_fn.rank, self.loss_fn.world_size = self.trainer.global_rank, self.trainer.world_size
        tau = float(self.loss_weights["logit_adjust"])
        if tau and stage == "fit" and getattr(self.trainer, "datamodule", None) is not None:
            counts = self.trainer.datamodule.caption_counts(len(self.hparams.vocabulary)).float()
            self.register_buffer("log_prior", tau * (counts + 1).div(counts.sum() + len(counts)).log(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """[B, K] caption logits with the current weights (no cached text features)."""
        g = self.guide
        return g.logit_scale * g.encode_image(x_t, t) @ g.clip.encode_captions().T

    # -- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, y = batch["image"] * 2.0 - 1.0, batch["caption"]
        if self.hparams.hflip:
            flip = torch.rand(len(x0), device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, self.num_timesteps, (len(x0),), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, torch.randn_like(x0), t)
        image = self.guide.encode_image(x_t, t)
        clip = self.guide.clip
        text = clip.get_text_features() if self.hparams.freeze_text else clip.encode_captions()
        scale = self.guide.logit_scale
        w = self.loss_weights
        loss = torch.zeros((), device=x0.device)
        if w["contrastive"]:
            contrastive = self.loss_fn(image, text[y], scale, y)
            self.log("train/loss_contrastive", contrastive)
            loss = loss + w["contrastive"] * contrastive
        if w["caption_ce"]:
            logits = scale * image @ text.T
            if getattr(self, "log_prior", None) is not None:  # logit adjustment: the raw logits learn p(x|y), not the prior
                logits = logits + self.log_prior.to(logits)
            ce = F.cross_entropy(logits, y)
            self.log("train/loss_ce", ce)
            loss = loss + w["caption_ce"] * ce
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale.detach())
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Clamp the logit scale right after each step (before the callbacks' batch-end hooks save checkpoints)."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.guide.clip.model.logit_scale.clamp_(0, math.log(self.hparams.logit_scale_max))

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_text:  # text features stay valid; the cache only needs the right device
            self.guide.refresh_text_features()

    # -- evaluation --------------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        x0, y = batch["image"] * 2.0 - 1.0, batch["caption"]
        seed = self.hparams.val_seed * 1_000_003 + batch_idx
        x_t, t, index = fixed_noisy_batch(x0, self.noise_scheduler, metrics.edges.cpu(), seed)
        metrics.update(self.guide.logits(x_t, t), y[index], t)
        if self.clean is not None:
            getattr(self, f"{stage}_clean").update(self.clean.logits(to_unit_range(x_t)), y[index], t)

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        majority = values[f"{metrics.prefix}acc_majority"]
        rows = {"noisy CLIP": metrics.per_bucket()}
        if self.clean is not None:
            clean = getattr(self, f"{stage}_clean")
            values |= {k: v for k, v in clean.compute().items() if not k.endswith("acc_majority")}
            rows["clean CLIP"] = clean.per_bucket()
            clean.reset()
        metrics.reset()
        self.log_dict({k: v for k, v in values.items() if not math.isnan(v)})
        epoch, every = self.current_epoch, max(1, self.hparams.plot_every_n_epochs)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and epoch % every == 0:
            self._save_curves(stage, epoch, rows, values, majority)

    def _save_curves(self, stage: str, epoch: int, rows: dict[str, list[dict[str, float]]],
                     values: dict[str, float], majority: float) -> None:
        out = Path(self.trainer.default_root_dir) / "noisy_eval"
        stem = f"{stage}_epoch{epoch:03d}_acc_vs_t"
        write_bucket_table(out / f"{stem}.tsv", rows)
        title = f"{stage} epoch {epoch} (step {self.global_step}): accuracy vs t, {self.schedule.get('beta_schedule')}"
        png = plot_accuracy_vs_t(rows, out / f"{stem}.png", title=title, chance=majority)
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key=f"{stage}/acc_vs_t", images=[str(png)], step=self.global_step)
        summary = {k: v for k, v in values.items() if not re.search(r"_t\d+$", k)}  # per bucket: in the TSV
        log.info("%s  %s", png, "  ".join(f"{k}={v:.3f}" for k, v in summary.items()))

    def on_validation_epoch_start(self) -> None:
        # fresh state: under ddp_spawn the initial metric tensors arrive in memory shared by both ranks
        for m in (self.val_metrics, self.test_metrics, getattr(self, "val_clean", None), getattr(self, "test_clean", None)):
            if m is not None:
                m.reset()
        self.guide.refresh_text_features()
        if self.clean is not None:
            self.clean.refresh_text_features()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    on_test_epoch_start = on_validation_epoch_start

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- optimisation and export -------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.hparams.optimizer or functools.partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.1)
        return build_optimizers(self.guide, optimizer, self.hparams.scheduler,
                                int(self.trainer.estimated_stepping_batches))

    def export(self, path: str | Path) -> Path:
        """The Lightning-free artefact :func:`~clipdiff.models.components.noisy_clip.load_noisy_clip` reads."""
        return self.guide.export(path, trained_steps=int(self.global_step), init_from=self.hparams.init_from)
