"""Diffusion helpers shared by the DDPM, the noisy CLIP and the (guided) sampler.

- :mod:`clipdiff.diffusion.schedule` — the one noise schedule (the ``diffusion`` config group) → diffusers
  schedulers, a compatibility check between two stored schedules, eps/v/x0 conversions, min-SNR weights.
- :mod:`clipdiff.diffusion.sampling` — the batched sampling loop with a ``cond_fn`` guidance hook.
"""
