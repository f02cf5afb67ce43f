"""``DdpmModule``: an unconditional DDPM (diffusers ``UNet2DModel``) with EMA weights, min-SNR loss and sample grids;
``CondDdpmModule``: the same UNet conditioned on the caption id, for classifier-free guidance.

Images arrive in [0, 1] from the CarsDataModule and are scaled to [-1, 1] here. The noise schedule is the
``diffusion`` config group, kept in the hyperparameters (so in every checkpoint) and in the export. The EMA copy
(``self.ema``, a ``torch.optim.swa_utils.AveragedModel``, so an ordinary submodule: it moves with the module and
is saved, restored and resumed with the state dict) is what validation, the sample grids and the export use.

The conditional DDPM (``model=ddpm_cond``, Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") adds a learned
embedding of the caption id to the UNet's timestep embedding (diffusers' ``num_class_embeds``: ids 0…K−1 are the
captions of the DataModule's vocabulary, id K is the *null* condition). In training each sample's caption is
replaced by the null id with probability ``p_uncond``, so one network learns eps(x_t, c) and eps(x_t, ∅); sampling
then combines the two (:class:`clipdiff.diffusion.guidance.CfgGuidance`). The export carries the vocabulary and the
null id so prompts can be mapped to ids without the training data.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from clipdiff.diffusion.sampling import sample, save_samples
from clipdiff.diffusion.schedule import min_snr_weights, sampling_scheduler, schedule_config, train_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import build_unet, unet_config
from clipdiff.models.export import save_export

log = logging.getLogger(__name__)


class EmaUpdate:
    """EMA step for ``AveragedModel(multi_avg_fn=…)``; with warmup the decay is min(decay, (1+n)/(10+n))."""

    def __init__(self, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ClipdiffError(f"model.ema_decay={decay} must be in [0, 1)")
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def __call__(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


class DdpmModule(L.LightningModule):
    def __init__(
        self,
        unet: dict[str, Any],
        diffusion: dict[str, Any],
        image_size: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        min_snr_gamma: float | None = None,
        channels_last: bool = False,
        sample_every_n_epochs: int | None = 1,
        sample_steps: int = 25,
        sample_eta: float = 1.0,
        num_sample_images: int = 16,
        sample_seed: int = 0,
        monitor: dict | None = None,  # {metric, mode}: what the checkpoint callbacks call best (kept in hparams)
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.schedule = schedule_config(diffusion)
        self.noise_scheduler = train_scheduler(self.schedule)
        self.image_size = int(image_size or unet.get("sample_size") or 32)
        self.unet = build_unet({**unet, "sample_size": self.image_size, **self.unet_conditioning(unet)})
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(self.unet, multi_avg_fn=EmaUpdate(ema_decay, ema_warmup), use_buffers=True)
        self.ema.requires_grad_(False)

    # -- conditioning (none here; CondDdpmModule overrides these) ----------------------------------------------
    def unet_conditioning(self, unet: dict[str, Any]) -> dict[str, Any]:
        """Extra UNet arguments for a conditional model (called while the UNet is built; reads ``self.hparams``)."""
        return {}

    def train_labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The class labels of a training batch (None: unconditional)."""
        return None

    def eval_labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return None

    def grid_labels(self, num_samples: int) -> torch.Tensor | None:
        return None

    # -- the objective -----------------------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x0 = images * 2.0 - 1.0
        if x0.shape[-1] != self.image_size or x0.shape[-2] != self.image_size:
            raise ClipdiffError(f"the model is built for {self.image_size}px images but the data gives "
                                f"{x0.shape[-2]}×{x0.shape[-1]}: set data.image_size={self.image_size} or pick a model preset")
        return x0.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x0

    def diffusion_loss(self, net: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
        """(min-SNR weighted) MSE between the network output and the eps / v target (``labels``: class ids of a
        conditional model)."""
        sched = self.noise_scheduler
        x_t = sched.add_noise(x0, noise, t)
        pred = net(x_t, t).sample if labels is None else net(x_t, t, class_labels=labels).sample
        pred_type = self.schedule.get("prediction_type", "epsilon")
        target = noise if pred_type == "epsilon" else sched.get_velocity(x0, noise, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weights(t, sched.alphas_cumprod, self.hparams.min_snr_gamma, pred_type)
        return (per_sample * weights).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self._prepare(batch["image"])
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        loss = self.diffusion_loss(self.unet, x0, noise, t, self.train_labels(batch))  # labels after t: same RNG order
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The EMA follows every optimizer step here, not in ``on_train_batch_end``: that hook runs after the
        callbacks' (a step checkpoint would hold an EMA one update behind its weights)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.unet)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The same loss with the EMA weights; noise and timesteps fixed per batch so epochs compare."""
        x0 = self._prepare(batch["image"])
        gen = torch.Generator().manual_seed(10_000 + batch_idx)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        loss = self.diffusion_loss(self.ema.module, x0, noise, t.to(x0.device), self.eval_labels(batch))
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    # -- sample grids ------------------------------------------------------------------------------------------
    def sample_images(self, num_samples: int, steps: int, seed: int = 0, sampler: str = "ddim",
                      eta: float | None = None) -> torch.Tensor:
        """Images in [0, 1] drawn with the EMA weights (DDIM with ``sample_eta`` by default)."""
        eta = self.hparams.get("sample_eta", 1.0) if eta is None else eta
        scheduler = sampling_scheduler(self.schedule, sampler, timestep_spacing="trailing")
        was_training = self.ema.training
        self.ema.eval()
        try:
            return sample(self.ema.module, scheduler, num_samples, generator=torch.Generator().manual_seed(seed),
                          steps=steps, image_size=self.image_size, eta=eta, progress=False,
                          class_labels=self.grid_labels(num_samples))
        finally:
            self.ema.train(was_training)

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        if not every or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        if not self.trainer.is_global_zero:
            return
        images = self.sample_images(self.hparams.num_sample_images, self.hparams.sample_steps, self.hparams.sample_seed)
        out = Path(self.trainer.default_root_dir) / "samples"
        try:
            path = save_samples(images, out, nrow=int(len(images) ** 0.5 + 0.999),
                                grid_name=f"epoch{self.current_epoch:03d}-step{self.global_step}.png", individual=False)
            log.info("sample grid: %s", path)
        except FileExistsError as e:
            log.warning("%s", e)
        from lightning.pytorch.loggers import WandbLogger

        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                from torchvision.utils import make_grid

                lg.log_image(key="samples", images=[make_grid(images, nrow=int(len(images) ** 0.5 + 0.999))],
                             step=self.global_step)

    # -- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt_fn = self.hparams.optimizer or torch.optim.AdamW
        optimizer = opt_fn(params=self.unet.parameters())
        sched_fn = self.hparams.scheduler
        if sched_fn is None:
            return optimizer
        kwargs = {}
        if "num_training_steps" in inspect.signature(sched_fn).parameters:
            kwargs["num_training_steps"] = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": sched_fn(optimizer, **kwargs), "interval": "step", "frequency": 1}}

    # -- checkpoints and export --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clipdiff_schedule"] = self.schedule  # also in hyper_parameters; explicit for readers

    def export_extra(self) -> dict[str, Any]:
        return {}

    def export(self, path: str | Path) -> Path:
        """A Lightning-free artefact: UNet config + EMA weights + noise schedule (load with ``load_ddpm``)."""
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.ema.module.state_dict().items()}
        return save_export(path, "ddpm", unet_config=unet_config(self.ema.module), state_dict=state,
                           schedule=dict(self.schedule), image_size=self.image_size, ema=True, **self.export_extra())


class CondDdpmModule(DdpmModule):
    """The DDPM conditioned on the caption id (``model=ddpm_cond``), trained with condition dropout for
    classifier-free guidance (see the module doc). ``vocabulary``: the DataModule's captions (``clipdiff.train``
    passes them), id ``len(vocabulary)`` is the null condition; ``p_uncond``: the share of each batch trained on it."""

    def __init__(self, unet: dict[str, Any], diffusion: dict[str, Any], vocabulary: list[str] | None = None,
                 p_uncond: float = 0.2, **kwargs: Any):
        super().__init__(unet, diffusion, **kwargs)
        self.vocabulary = list(vocabulary)
        self.null_id = len(self.vocabulary)

    def unet_conditioning(self, unet: dict[str, Any]) -> dict[str, Any]:
        vocabulary, p = self.hparams.get("vocabulary"), self.hparams.get("p_uncond")
        if not vocabulary:
            raise ClipdiffError("the conditional DDPM needs the caption vocabulary: train it with "
                                "`python -m clipdiff.train model=ddpm_cond` on a root with captions")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
            raise ClipdiffError(f"model.p_uncond={p!r} must be a number in [0, 1] (the share of samples trained "
                                "on the null condition)")
        k = len(vocabulary) + 1
        if unet.get("num_class_embeds") not in (None, k):
            raise ClipdiffError(f"model.unet.num_class_embeds={unet['num_class_embeds']} but the data has "
                                f"{k - 1} captions + the null id: leave it null (it is set from the vocabulary)")
        if unet.get("class_embed_type") is not None:
            raise ClipdiffError(f"model.unet.class_embed_type={unet['class_embed_type']!r}: the conditional DDPM "
                                "embeds caption ids with a learned table (leave it null)")
        return {"num_class_embeds": k}

    def train_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's caption ids, each replaced by the null id with probability ``p_uncond`` (torch's global
        generator, drawn after the noise and timesteps: seeded by ``seed`` and restored on resume)."""
        labels = batch["caption"].long()
        drop = torch.rand(labels.shape, device=labels.device) < float(self.hparams.p_uncond)
        return torch.where(drop, torch.full_like(labels, self.null_id), labels)

    def eval_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """Validation: the conditional loss (every caption kept)."""
        return batch["caption"].long()

    def grid_labels(self, num_samples: int) -> torch.Tensor:
        """Sample grids cycle through the captions, conditionally (w = 1, no guidance)."""
        return torch.arange(num_samples) % len(self.vocabulary)

    def export_extra(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocabulary), "null_id": self.null_id,
                "p_uncond": float(self.hparams.p_uncond)}
