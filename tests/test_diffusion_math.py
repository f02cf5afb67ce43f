"""The diffusion helpers against independent references: diffusers' own DDIM step, and values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from clipdiff.diffusion.schedule import min_snr_weights, predict_x0, sampling_scheduler, to_eps
from clipdiff.models.ddpm_module import EmaUpdate

COSINE_V = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
            "clip_sample": False}
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


# t = 999 is left out: ā = 2.4e-9 there, and x̂₀ through eps divides by sqrt(ā) (float32 error ~1e-3, while
# diffusers computes sqrt(ā)·x_t − sqrt(1−ā)·v directly)
@pytest.mark.parametrize("t", [0, 10, 250, 600, 990])
def test_x0_from_a_v_prediction_is_diffusers_ddim_x0(t):
    """The default schedule (cosine, v-prediction): our v → eps → x̂₀ against ``DDIMScheduler.step``'s own
    ``pred_original_sample`` (a round trip v→eps→v would pass with both directions wrong together)."""
    scheduler: DDIMScheduler = sampling_scheduler(COSINE_V, "ddim")
    scheduler.set_timesteps(50)
    torch.manual_seed(t)
    x_t, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ours = predict_x0(x_t, to_eps(v, x_t, t, scheduler.alphas_cumprod, "v_prediction"), t, scheduler.alphas_cumprod)
    ref = scheduler.step(v, t, x_t, eta=0.0).pred_original_sample
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_min_snr_weights_by_hand():
    """Min-SNR-γ (Hang et al. 2023): w = min(SNR, γ)/SNR for eps, min(SNR, γ)/(SNR + 1) for v-prediction."""
    abar = torch.tensor([0.9999, 0.5, 0.01])  # SNR = 9999, 1, 1/99
    t = torch.arange(3)
    eps = min_snr_weights(t, abar, 5.0, "epsilon")
    v = min_snr_weights(t, abar, 5.0, "v_prediction")
    assert torch.allclose(eps, torch.tensor([5 / 9999, 1.0, 1.0]), rtol=1e-3)
    assert torch.allclose(v, torch.tensor([5 / 10000, 0.5, 1 / 100]), rtol=1e-3)
    assert torch.equal(min_snr_weights(t, abar, None, "epsilon"), torch.ones(3))


def test_ema_warm_up_by_hand():
    """decay_n = min(decay, (1 + n) / (10 + n)) on the n-th update: 2/11 at n = 1, so the EMA moves 9/11 of the way;
    at n = 10 000 the cap 0.999 holds. Without warm-up every update moves 1 - decay."""
    for warmup, n, moved in ((True, 1, 9 / 11), (True, 10_000, 0.001), (False, 1, 0.001)):
        ema, params = [torch.zeros(3)], [torch.ones(3)]
        EmaUpdate(0.999, warmup=warmup)(ema, params, torch.tensor(n))
        assert torch.allclose(ema[0], torch.full((3,), moved), rtol=1e-5), (warmup, n)
