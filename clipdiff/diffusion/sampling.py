"""The batched sampling loop (DDIM or DDPM) with a guidance hook.

Guidance contract — ``cond_fn(x_t, t, eps, index) -> eps``:

- ``x_t``   float [B, 3, H, W], the current noisy images in [-1, 1] scale (no grad; a guide that needs
  ``grad_x`` does ``with torch.enable_grad(): x = x_t.detach().requires_grad_()`` itself);
- ``t``     int, the timestep on the training scale (0 … num_train_timesteps-1), as the noisy CLIP was trained;
- ``eps``   float [B, 3, H, W], the model's predicted noise (v-prediction models are converted to eps first);
- ``index`` int64 [B], which of the ``num_samples`` images this batch holds (for per-sample targets);
- returns the modified eps, e.g. ``eps - s·sqrt(1-abar_t)·grad log p(y|x_t)`` (``abar`` from
  ``scheduler.alphas_cumprod``; :func:`clipdiff.diffusion.schedule.predict_x0` gives x0_hat).

A cond_fn may also have ``output(x_t, t, model_output, index) -> model_output``: the loop applies it first, in the
model's own output space (v or eps), then the eps stage above. A conditional UNet (``num_class_embeds``, the
conditional DDPM of ``model=ddpm_cond``) is called with ``class_labels`` (one id per sample; by default its null id
``num_class_embeds − 1``, i.e. unconditional samples); classifier-free guidance is a cond_fn whose ``output`` calls it
once more with the captions' ids (:class:`clipdiff.diffusion.guidance.CfgEps`).

``recurrence`` k > 1 is universal guidance's self-recurrence (Bansal et al. 2023, "Universal Guidance for Diffusion
Models", Alg. 1): after a guided step x_t → x_{t'} (t' the next timestep) x_t is drawn again from
q(x_t | x_{t'}) = N(sqrt(ā_t/ā_{t'})·x_{t'}, (1 − ā_t/ā_{t'})·I) with fresh noise and the step is repeated, k steps in
all; k = 1 is the plain loop (no extra draw from the generator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from clipdiff.diffusion.schedule import eps_change_as_output, sampling_scheduler, to_eps
from clipdiff.errors import ClipdiffError

log = logging.getLogger(__name__)

CondFn = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]


# the presets of conf/sampler/*.yaml for Python callers (tests/test_pipelines.py checks that they agree)
PRESETS = {"ddim": {"name": "ddim", "steps": 50, "eta": 0.0, "timestep_spacing": "trailing"},
           "ddim_stochastic": {"name": "ddim", "steps": 50, "eta": 1.0, "timestep_spacing": "trailing"},
           "ddpm": {"name": "ddpm", "steps": 1000, "eta": 0.0, "timestep_spacing": "leading"}}


class Sampler:
    """A sampling recipe (``conf/sampler/*.yaml`` instantiates one): the scheduler (``ddim`` or ``ddpm``), the number
    of steps, DDIM's ``eta``, and sampling-only scheduler settings (``timestep_spacing``, ``clip_sample``, …) that
    :func:`clipdiff.diffusion.schedule.sampling_scheduler` applies on top of the training betas."""

    def __init__(self, name: str = "ddim", steps: int = 50, eta: float = 0.0, **scheduler_options: Any):
        self.name, self.steps, self.eta = str(name), int(steps), float(eta)
        self.options = dict(scheduler_options)

    @classmethod
    def preset(cls, name: str) -> Sampler:
        """``ddim``, ``ddim_stochastic`` or ``ddpm``: the settings of ``conf/sampler/<name>.yaml``."""
        if name not in PRESETS:
            raise ClipdiffError(f"sampler={name!r}: choose {', '.join(PRESETS)} (or a Sampler)")
        return cls(**PRESETS[name])

    def check(self, prefix: str = "sampler") -> Sampler:
        if self.steps < 1:
            raise ClipdiffError(f"{prefix}.steps={self.steps} must be at least 1")
        if self.eta < 0:
            raise ClipdiffError(f"{prefix}.eta={self.eta} must be ≥ 0")
        return self

    def scheduler(self, schedule: Mapping[str, Any], prefix: str = "sampler"):
        """A fresh diffusers scheduler with the training betas of ``schedule`` (the DDPM's); a step count whose
        steps would land between the timesteps the model is called at is refused (:func:`check_timesteps`)."""
        scheduler = sampling_scheduler(schedule, self.name, **self.options)
        check_timesteps(scheduler, self.steps, prefix)
        return scheduler

    def replace(self, **changes: Any) -> Sampler:
        kw = {"name": self.name, "steps": self.steps, "eta": self.eta, **self.options}
        return Sampler(**{**kw, **{k: v for k, v in changes.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "eta": self.eta, **self.options}

    def __repr__(self) -> str:
        return f"Sampler({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


def check_timesteps(scheduler, steps: int, prefix: str = "sampler") -> list[int]:
    """The timesteps of ``steps`` sampling steps; refused (one line naming ``<prefix>.steps``) unless each step
    moves x_t exactly to the timestep the model is called at next.

    diffusers' DDIM (and DDPM without custom timesteps) steps from t to ``t - T // steps``, but ``trailing`` and
    ``linspace`` spacing place the timesteps ``T / steps`` apart: when ``steps`` does not divide T the step lands
    on another noise level than the next model call assumes (e.g. T=1000, 30 steps: a step to 933, a call at 932).
    """
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    n = int(scheduler.config.num_train_timesteps)
    if isinstance(scheduler, DDIMScheduler):  # DDIMScheduler.step's own rule
        prev = [t - n // scheduler.num_inference_steps for t in ts]
    else:
        prev = [int(scheduler.previous_timestep(t)) for t in ts]
    for i in range(len(ts) - 1):
        if prev[i] != ts[i + 1]:
            spacing = scheduler.config.timestep_spacing
            raise ClipdiffError(
                f"{prefix}.steps={steps} with timestep_spacing={spacing}: a step from t={ts[i]} lands on t={prev[i]} "
                f"but the model is next called at t={ts[i + 1]}; choose {prefix}.steps that divides {n} "
                f"or {prefix}.timestep_spacing=leading")
    return ts


def step_options(scheduler, eta: float) -> dict[str, Any]:
    """The keyword arguments of ``scheduler.step`` for every method, guided or not: DDIM's ``eta``, and DDIM steps
    with the eps consistent with its clamped x0_hat (``use_clipped_model_output``; a no-op without ``clip_sample``),
    so a guided step with scale → 0 is the unguided step (the clamp cannot turn eps guidance round: a clamped pixel
    would otherwise keep only the eps term of the guided update, which points against the guidance)."""
    return {"eta": eta, "use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}


def null_label(unet: torch.nn.Module) -> int | None:
    """The null id of a conditional UNet (the last class embedding, as ``model=ddpm_cond`` trains it), or None."""
    n = getattr(unet.config, "num_class_embeds", None)
    return int(n) - 1 if n else None


def class_labels_for(unet: torch.nn.Module, num_samples: int, class_labels: torch.Tensor | None) -> torch.Tensor | None:
    """Each sample's class id for the UNet: the given ids, the null id of a conditional UNet, None for an
    unconditional one (ids for an unconditional UNet are one line of error)."""
    null = null_label(unet)
    if class_labels is None:
        return None if null is None else torch.full((num_samples,), null, dtype=torch.long)
    if null is None:
        raise ClipdiffError("class labels were given but the DDPM is unconditional (train model=ddpm_cond)")
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    if len(labels) != num_samples or labels.min() < 0 or labels.max() > null:
        raise ClipdiffError(f"class labels: give {num_samples} ids in 0…{null} (got {len(labels)})")
    return labels


def previous_abar(scheduler, t: int) -> torch.Tensor:
    """ā of the timestep a step from ``t`` lands on, as the scheduler's own ``step`` takes it (DDIM: t − T // steps,
    ``final_alpha_cumprod`` past 0; DDPM: ``previous_timestep``, 1 past 0)."""
    if isinstance(scheduler, DDIMScheduler):
        prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return scheduler.alphas_cumprod[prev] if prev >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod)
    prev = int(scheduler.previous_timestep(int(t)))
    return scheduler.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)


def renoise(x_prev: torch.Tensor, scheduler, t: int, generator: torch.Generator) -> torch.Tensor:
    """x_t ~ q(x_t | x_{t'}) from the result x_{t'} of a step from ``t`` (self-recurrence): sqrt(ā_t/ā_{t'})·x_{t'} +
    sqrt(1 − ā_t/ā_{t'})·ε, with ε from ``generator`` (CPU) and ā the cumulative products."""
    ratio = (scheduler.alphas_cumprod[int(t)].double() / previous_abar(scheduler, t).double()).clamp(0.0, 1.0)
    eps = torch.randn(x_prev.shape, generator=generator).to(x_prev.device, x_prev.dtype)
    return (ratio.sqrt().item() * x_prev + (1.0 - ratio).sqrt().item() * eps).to(x_prev.dtype)


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    steps: int = 50,
    image_size: int | None = None,
    batch_size: int = 64,
    cond_fn: CondFn | None = None,
    eta: float = 0.0,
    progress: bool = True,
    class_labels: torch.Tensor | None = None,
    recurrence: int | Callable[[int], int] = 1,
) -> torch.Tensor:
    """Draw ``num_samples`` images with ``scheduler`` (a DDIM/DDPM scheduler from
    :func:`clipdiff.diffusion.schedule.sampling_scheduler`); returns float [N, 3, H, W] in [0, 1] on the CPU.

    All randomness comes from ``generator`` (a CPU ``torch.Generator``), so a seed gives the same images for
    the same ``batch_size`` on any device. ``class_labels``: each sample's id for a conditional UNet (default: its
    null id). ``recurrence``: steps per timestep (self-recurrence, see the module doc), or a function of t.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    size = image_size or unet.config.sample_size
    channels = unet.config.in_channels
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    pred_type = scheduler.config.prediction_type
    abar = scheduler.alphas_cumprod
    step_kw = step_options(scheduler, eta)
    timesteps = check_timesteps(scheduler, steps)
    labels = class_labels_for(unet, num_samples, class_labels)
    output_fn = getattr(cond_fn, "output", None)  # a stage in the model's output space (classifier-free guidance)
    noise = torch.randn((num_samples, channels, size, size), generator=generator)
    out = []
    for start in range(0, num_samples, batch_size):
        x = noise[start : start + batch_size].to(device, dtype)
        index = torch.arange(start, start + x.shape[0], device=device)
        kw = {} if labels is None else {"class_labels": labels[start : start + batch_size].to(device)}
        for t in tqdm(timesteps, desc=f"sampling {start + x.shape[0]}/{num_samples}", disable=not progress,
                      leave=False):
            repeats = int(recurrence(t) if callable(recurrence) else recurrence)
            x_prev = x
            for r in range(max(repeats, 1)):
                if r:  # self-recurrence: x_t again from the step's result, with fresh noise
                    x = renoise(x_prev, scheduler, t, generator)
                model_out = unet(x, t, **kw).sample
                if output_fn is not None:
                    model_out = output_fn(x, t, model_out, index)
                if cond_fn is not None:
                    eps = to_eps(model_out, x, t, abar, pred_type)
                    model_out = model_out + eps_change_as_output(cond_fn(x, t, eps, index) - eps, t, abar, pred_type)
                x_prev = scheduler.step(model_out, t, x, generator=generator, **step_kw).prev_sample
            x = x_prev
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def save_samples(images: torch.Tensor, out_dir: str | Path, nrow: int = 8, grid_name: str = "grid.png",
                 individual: bool = True) -> Path:
    """Write ``grid.png`` and (optionally) ``samples/000000.png …`` into ``out_dir``; never overwrites a file."""
    from torchvision.utils import make_grid

    out_dir = Path(out_dir)
    grid_path = out_dir / grid_name
    if grid_path.exists():
        raise FileExistsError(f"{grid_path} exists; sampling never overwrites a run's images")
    if individual:
        for i, img in enumerate(images):
            save_png(img, out_dir / "samples" / f"{i:06d}.png")
    save_png(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), grid_path)
    return grid_path


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """One float [3, H, W] image in [0, 1] → PNG, written atomically."""
    from PIL import Image

    from clipdiff.utils.io import atomic_open

    arr = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_open(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")
    return Path(path)
