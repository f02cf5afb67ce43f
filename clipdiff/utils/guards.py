"""Training stops at the first non-finite number, naming the step and the likely key, and writes nothing non-finite.

:class:`FiniteLoss` checks the training loss before its backward pass (so the weights never take that step), the
validation losses before the checkpoint callbacks read them, and every tensor of a checkpoint before it is written
(a step can leave finite loss but overflowing weights). Each stop is a :class:`~clipdiff.errors.ClipdiffError`:
one line, exit status 2, the checkpoints and ``export.pt`` of the run left as they were.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from clipdiff.errors import ClipdiffError


def _finite(trainer: Any, ok: bool) -> bool:
    """Every rank's verdict (a rank that stops alone would leave the others waiting in a collective)."""
    return bool(trainer.strategy.reduce_boolean_decision(ok, all=True)) if trainer.world_size > 1 else ok


class FiniteLoss(Callback):
    def __init__(self, key: str = "model.optimizer.lr") -> None:
        self.key = key

    def _stop(self, trainer: Any, what: str) -> None:
        lrs = [g.get("initial_lr", g["lr"]) for opt in trainer.optimizers for g in opt.param_groups][:1]
        now = f" (now {lrs[0]:g}, before any schedule)" if lrs else ""
        raise ClipdiffError(
            f"{what} at step {trainer.global_step} (epoch {trainer.current_epoch}): training stopped there, the "
            f"checkpoints hold earlier steps; a learning rate too high is the usual cause: lower {self.key}{now}")

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if not _finite(trainer, bool(torch.isfinite(loss.detach()).all())):
            self._stop(trainer, f"the training loss is {float(loss.detach().float().mean()):g}")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        bad = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("val/") and "loss" in k and torch.is_tensor(v) and v.numel() == 1 and not math.isfinite(float(v))}
        if not _finite(trainer, not bad):
            self._stop(trainer, f"validation gave {', '.join(f'{k}={v:g}' for k, v in sorted(bad.items())) or 'non-finite metrics'}")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if not _finite(trainer, not bad):
            self._stop(trainer, f"the weights are not finite ({', '.join(bad[:3]) or 'on another rank'})")
