"""Optimiser helpers shared by the models: weight-decay parameter groups and a warmup + cosine schedule."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on 1-d tensors (norm scales, biases, class token) nor ``logit_scale``."""
    return param.ndim < 2 or "bias" in name or "logit_scale" in name


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights and the rest (norms, biases, logit scale); frozen params left out."""
    decay, rest = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr_ratio`` × lr; ``warmup`` < 1 is a fraction of the steps."""
    total = max(1, int(total_steps))
    warm = round(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    warm = min(warm, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizers(module: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                     scheduler: Callable[..., Any] | None, total_steps: int,
                     params: Iterable | None = None) -> dict[str, Any] | torch.optim.Optimizer:
    """Call the Hydra partials: ``optimizer(param_groups)``, ``scheduler(opt[, total_steps=…])`` per step.

    The optimizer partial's ``weight_decay`` applies to the decayed group only.
    """
    wd = getattr(optimizer, "keywords", {}).get("weight_decay", 0.0)
    opt = optimizer(params if params is not None else param_groups(module, wd))
    if scheduler is None:
        return opt
    target = getattr(scheduler, "func", scheduler)
    kwargs = {"total_steps": total_steps} if "total_steps" in inspect.signature(target).parameters else {}
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt, **kwargs), "interval": "step"}}
