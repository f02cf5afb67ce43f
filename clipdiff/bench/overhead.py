"""Framework overhead: a training step through the Lightning Trainer vs a bare PyTorch loop (goal: within 5%).

Same LightningModule (the demo's presets, composed from ``conf/model/<name>.yaml``), same batch, same optimizer
and LR schedule (from the module's own ``configure_optimizers``), same per-step model work (EMA update, logit-scale
clamp). The bare loop leaves out only what the framework adds: hooks, ``self.log``, the fit loop. The two loops alternate
step by step inside one ``fit`` (see :func:`paired_steps`), so machine-load drift hits both alike; the figure is
the median over step pairs of Lightning step time / bare step time, minus 1 (warm-up steps dropped).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch

from clipdiff.bench.common import Claim, compose

MODELS = {"clip": 64, "ddpm": 32}  # batch sizes of the demo's training stages (conf/pipeline.yaml)


def build_module(name: str, image_size: int = 32, seed: int = 0):
    """The model group ``name`` as ``python -m clipdiff.train model=<name>`` builds it (random init)."""
    from clipdiff.data.vocab import caption_prior
    from clipdiff.train import build_model

    cfg = compose("train", [f"model={name}", f"data.image_size={image_size}"])
    torch.manual_seed(seed)
    return build_model(cfg.model, SimpleNamespace(vocab=SimpleNamespace(to_list=lambda: sorted(caption_prior()))))


def fake_batch(batch_size: int, image_size: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(batch_size, 3, image_size, image_size, generator=g),
            "caption": torch.randint(0, vocab, (batch_size,), generator=g),
            "object": torch.arange(batch_size), "view": torch.zeros(batch_size, dtype=torch.long)}


class SameBatch(torch.utils.data.Dataset):
    """``steps`` copies of one batch, for ``DataLoader(…, batch_size=None)``: both loops read the same loader."""

    def __init__(self, batch: dict[str, torch.Tensor], steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batch


def loader(batch: dict[str, torch.Tensor], steps: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(SameBatch(batch, steps), batch_size=None)


def optimizers(module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The module's own ``configure_optimizers()`` (it reads only ``trainer.estimated_stepping_batches``)."""
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    try:
        conf = module.configure_optimizers()
    finally:
        module.trainer = None
    if isinstance(conf, torch.optim.Optimizer):
        return conf, None
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def bare_loss(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's training step without ``self.log`` (framework work)."""
    name = type(module).__name__
    if name == "DdpmModule":
        x0 = module._prepare(batch["image"])
        t = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (x0.shape[0],))
        return module.diffusion_loss(module.unet, x0, torch.randn_like(x0), t)
    if name == "ClipModule":
        x, y = batch["image"], batch["caption"]
        if module.hparams.hflip:
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        ids, inverse = y.unique(return_inverse=True)
        return module.loss_fn(module.clip.encode_image(x), module.clip.encode_captions(ids)[inverse],
                              module.clip.logit_scale, y)
    raise ValueError(f"no bare training step for {name}")


class BareLoop:
    """The bare PyTorch loop, one step per call: fetch, forward, backward, optimizer and schedule, model upkeep."""

    def __init__(self, module, batch: dict[str, torch.Tensor], steps: int):
        self.module = module.train()
        self.opt, self.sched = optimizers(module, 10_000)
        self.batches = iter(loader(batch, steps))

    def step(self) -> None:
        m, batch = self.module, next(self.batches)
        loss = bare_loss(m, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        with torch.no_grad():  # the per-step upkeep the modules do after each optimizer step
            if type(m).__name__ == "ClipModule":
                m.clip.model.logit_scale.clamp_(0, math.log(m.hparams.logit_scale_max))
            elif type(m).__name__ == "DdpmModule":
                m.ema.update_parameters(m.unet)


def paired_steps(lit, bare, batch: dict[str, torch.Tensor], steps: int, model: str) -> tuple[list[float], list[float]]:
    """One ``trainer.fit`` (the project's CPU trainer; no logger, checkpoints or progress bar) whose every step is
    preceded by one bare-loop step, so the two alternate step by step and share the machine's load.

    Returns (Lightning step times, bare step times); a Lightning step is everything between the end of one bare
    step and the start of the next (fit loop, hooks, logging, the module's step, optimizer)."""
    import lightning as L
    from hydra.utils import instantiate

    runner = BareLoop(bare, batch, steps)
    marks: list[tuple[float, float]] = []

    class Alternate(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            t0 = time.perf_counter()
            runner.step()
            marks.append((t0, time.perf_counter()))

        def on_train_end(self, trainer, pl_module):
            marks.append((time.perf_counter(), time.perf_counter()))

    cfg = compose("train", [f"model={model}", "trainer=cpu"]).trainer
    trainer = instantiate(cfg, max_steps=steps, max_epochs=1, logger=False, callbacks=[Alternate()],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, default_root_dir=None, _convert_="all")
    trainer.fit(lit, train_dataloaders=loader(batch, steps))
    return [nxt[0] - cur[1] for cur, nxt in itertools.pairwise(marks)], [b - a for a, b in marks[:-1]]


def bench_overhead(models: dict[str, int] | None = None, steps: int = 16, warmup: int = 2,
                   image_size: int = 32) -> list[Claim]:
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers to INFO on import: quieten them after)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    claims = []
    for model, bs in (models or MODELS).items():
        lit, bare = build_module(model, image_size), build_module(model, image_size)
        vocab = len(getattr(lit, "clip", SimpleNamespace(vocabulary=[0] * 43)).vocabulary)
        batch = fake_batch(bs, image_size, vocab)
        lit_times, bare_times = paired_steps(lit, bare, batch, steps + warmup, model)
        lit_times, bare_times = lit_times[warmup:], bare_times[warmup:]
        ratio = statistics.median(a / b for a, b in zip(lit_times, bare_times))
        claims += [Claim(f"overhead/{model}_bare_s_per_step@b{bs}", statistics.median(bare_times), None, "s"),
                   Claim(f"overhead/{model}_lightning_s_per_step@b{bs}", statistics.median(lit_times), None, "s"),
                   Claim(f"overhead/{model}_lightning_vs_bare", ratio - 1, 0.05,
                         f"fraction slower (median of {steps} alternating step pairs)", higher_is_better=False)]
    return claims
