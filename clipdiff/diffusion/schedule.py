"""The noise schedule: one config group (``conf/diffusion/*.yaml``) for training and sampling, DDPM and noisy CLIP.

A *schedule* is a plain dict of :class:`diffusers.DDPMScheduler` arguments (``num_train_timesteps``,
``beta_schedule``, ``beta_start``, ``beta_end``, ``prediction_type``, ``clip_sample``, …). Models store it in their
checkpoints and exports; samplers are built from it with ``DDIMScheduler.from_config(train_scheduler.config)`` so
training and sampling can never disagree about the betas.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from clipdiff.errors import ClipdiffError

# keys that decide the betas (and so alphas_cumprod): two models can share x_t only when these agree
NOISE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
              "rescale_betas_zero_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
_DDPM_ARGS = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}


def schedule_config(schedule: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a schedule (config node, dict or a scheduler's ``config``) and return it as a plain dict."""
    if hasattr(schedule, "_content"):  # an OmegaConf node
        from omegaconf import OmegaConf

        schedule = OmegaConf.to_container(schedule, resolve=True)
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(schedule).items() if not k.startswith("_")}
    unknown = sorted(set(out) - _DDPM_ARGS)
    if unknown:
        raise ClipdiffError(f"diffusion: unknown key(s) {', '.join(unknown)} (DDPMScheduler takes: {', '.join(sorted(_DDPM_ARGS))})")
    if out.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ClipdiffError(f"diffusion.prediction_type={out['prediction_type']!r}: choose {' or '.join(PREDICTION_TYPES)}")
    return out


def train_scheduler(schedule: Mapping[str, Any]) -> DDPMScheduler:
    """The training scheduler (``add_noise``, ``get_velocity``, ``alphas_cumprod``) of a schedule."""
    try:
        return DDPMScheduler(**schedule_config(schedule))
    except (ValueError, NotImplementedError) as e:
        raise ClipdiffError(f"diffusion: {e}") from None


def sampling_scheduler(schedule: Mapping[str, Any], sampler: str = "ddim", **overrides: Any):
    """A DDIM or DDPM sampling scheduler with exactly the training betas.

    ``overrides`` change sampling-only settings (``timestep_spacing``, ``clip_sample``, …), never the betas.
    """
    if sampler not in SAMPLERS:
        raise ClipdiffError(f"sampler={sampler!r}: choose {' or '.join(SAMPLERS)}")
    bad = sorted(set(overrides) & set(NOISE_KEYS))
    if bad:
        raise ClipdiffError(f"sampler settings may not change the noise schedule ({', '.join(bad)})")
    scheduler = SAMPLERS[sampler].from_config(train_scheduler(schedule).config, **overrides)
    if sampler == "ddim":  # DDIM's step takes sqrt(1 - ā_prev - σ²), 0 up to rounding on a step from ā_T ≈ 0 at eta 1:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # float32 rounds it below 0 (NaN images)
    return scheduler


def _normalised(schedule: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(train_scheduler(schedule).config)
    if cfg["beta_schedule"] == "squaredcos_cap_v2":  # beta_start/end are not used by the cosine schedule
        cfg["beta_start"] = cfg["beta_end"] = None
    return cfg


def check_compatible(a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str] = ("a", "b"),
                     keys: tuple[str, ...] = NOISE_KEYS) -> None:
    """Raise ClipdiffError naming the first key (of ``keys``) on which two schedules disagree.

    Missing keys count as diffusers' defaults. ``names`` say where each schedule came from, for the message.
    """
    na, nb = _normalised(a), _normalised(b)
    for key in keys:
        va, vb = na.get(key), nb.get(key)
        same = va == vb if not (isinstance(va, float) and isinstance(vb, float)) else abs(va - vb) <= 1e-12
        if not same:
            raise ClipdiffError(
                f"noise schedules differ: {key} is {va!r} in {names[0]} but {vb!r} in {names[1]} "
                f"(train both with the same diffusion=… config)"
            )


def _abar(alphas_cumprod: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    abar = alphas_cumprod.to(like.device, torch.float32)[torch.as_tensor(t, device=like.device).long()]
    return abar.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_eps(model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, alphas_cumprod: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    """The model's output as predicted noise (eps = sqrt(abar)·v + sqrt(1-abar)·x_t for v-prediction)."""
    if prediction_type == "epsilon":
        return model_output
    abar = _abar(alphas_cumprod, t, x_t)
    return abar.sqrt() * model_output + (1 - abar).sqrt() * x_t


def eps_change_as_output(delta: torch.Tensor, t: int | torch.Tensor, alphas_cumprod: torch.Tensor,
                         prediction_type: str) -> torch.Tensor:
    """A change of the predicted noise as the same change of the model's output (v = (eps − sqrt(1−abar)·x_t) /
    sqrt(abar) is linear in eps: dv = d eps / sqrt(abar)). Adding it to the output, rather than converting eps back, keeps an
    unchanged eps bit for bit the model's output (at high noise the round trip loses the output's low bits)."""
    if prediction_type == "epsilon":
        return delta
    return delta / _abar(alphas_cumprod, t, delta).sqrt()


def output_change_as_eps(delta: torch.Tensor, t: int | torch.Tensor, alphas_cumprod: torch.Tensor,
                         prediction_type: str) -> torch.Tensor:
    """A change of the model's output as the same change of the predicted noise (the inverse of
    :func:`eps_change_as_output`: d eps = sqrt(abar)·dv for v-prediction)."""
    if prediction_type == "epsilon":
        return delta
    return delta * _abar(alphas_cumprod, t, delta).sqrt()


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1-abar)·eps) / sqrt(abar), differentiable in x_t and eps (images in [-1, 1])."""
    abar = _abar(alphas_cumprod, t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float | None,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023); ones when ``gamma`` is None."""
    if gamma is None:
        return torch.ones(t.shape, device=t.device)
    abar = alphas_cumprod.to(t.device, torch.float32)[t.long()]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
