"""``RealismModule``: trains the realism feature net (:class:`~clipdiff.models.components.realism.RealismNet`) to tell
the camera direction from grey images. ``python -m clipdiff.train model=realism``.

The target is each view's unit camera direction (``pose`` in the batch, :mod:`clipdiff.data.poses`), which the module
asks the shared DataModule for in ``setup``; captions are never read. Loss: mean squared error between the net's
output and the unit direction. Logged: ``train/loss``, ``val/loss``; ``val/angle_deg`` (mean angle between the
predicted and the true camera direction, degrees), ``val/azimuth_deg`` and ``val/elevation_deg`` (mean absolute
azimuth / elevation error about the world axis ``up``), and ``val/angle_deg_constant``, the error of the best
constant guess (the mean training direction) for scale; the same under ``test/``. ``export(path)`` writes the
Lightning-free ``export.pt`` that :func:`~clipdiff.models.components.realism.load_realism` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from clipdiff.data.poses import UP_AXES, azimuth_elevation
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.optim import build_optimizers
from clipdiff.models.components.realism import RealismNet
from clipdiff.models.export import save_export


def angle_deg(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between directions [B, 3] (need not be unit length), per row."""
    cos = F.cosine_similarity(pred.double(), target.double(), dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).float()


def pose_errors(pred: torch.Tensor, target: torch.Tensor, up: str = "z") -> dict[str, torch.Tensor]:
    """Per-row angle, absolute azimuth (wrapped to [0, 180]) and absolute elevation errors in degrees."""
    az_p, el_p = azimuth_elevation(pred, up)
    az_t, el_t = azimuth_elevation(target, up)
    d_az = torch.remainder(az_p - az_t + 180.0, 360.0) - 180.0
    return {"angle_deg": angle_deg(pred, target), "azimuth_deg": d_az.abs(), "elevation_deg": (el_p - el_t).abs()}


class RealismModule(L.LightningModule):
    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        net: dict[str, Any] | None = None,
        up: str = "z",
        monitor: dict | None = None,  # {metric, mode}: what the checkpoint callbacks call best (kept in hparams)
    ):
        super().__init__()
        if up not in UP_AXES:
            raise ClipdiffError(f"model.up={up!r}: choose one of {', '.join(UP_AXES)} (the world's up axis)")
        self.save_hyperparameters(logger=False)
        self.net = RealismNet(**(net or {}))
        # the mean training direction (set in setup("fit")): the constant guess the val error is compared with
        self.register_buffer("constant_guess", torch.zeros(3))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if not hasattr(dm, "request_poses"):
            raise ClipdiffError("model=realism learns camera poses: train it on CarsDataModule (data=cars), whose "
                                "batches can carry them")
        dm.request_poses()
        if stage == "fit":
            poses = torch.as_tensor(dm._dataset("train").poses, dtype=torch.float64).mean(dim=0)
            self.constant_guess.copy_((poses / poses.norm().clamp_min(1e-12)).float())

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(x01)

    def _target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "pose" not in batch:
            raise ClipdiffError("the batch has no 'pose': the DataModule must carry camera poses (request_poses)")
        return batch["pose"].float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        target = self._target(batch)
        loss = F.mse_loss(self(batch["image"]), target, reduction="none").sum(dim=1).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(target))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        target = self._target(batch)
        pred = self(batch["image"])
        n = len(target)
        loss = F.mse_loss(pred, target, reduction="none").sum(dim=1).mean()
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)
        errors = pose_errors(pred, target, self.hparams.up)
        for name, err in errors.items():
            self.log(f"{stage}/{name}", err.mean(), on_epoch=True, batch_size=n, sync_dist=True,
                     prog_bar=stage == "val" and name == "angle_deg")
        if self.constant_guess.abs().sum() > 0:
            const = angle_deg(self.constant_guess.expand_as(target), target).mean()
            self.log(f"{stage}/angle_deg_constant", const, on_epoch=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        """AdamW without decay on norms and biases; the schedule per step over all steps (``optim.build_optimizers``)."""
        return build_optimizers(self.net, self.hparams.optimizer, self.hparams.scheduler,
                                int(self.trainer.estimated_stepping_batches))

    def export(self, path: str | Path) -> Path:
        """The Lightning-free realism net: config, weights and image size (see ``load_realism``)."""
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return save_export(path, "realism", config=dict(self.net.config), state_dict=state,
                           image_size=self.net.image_size)
