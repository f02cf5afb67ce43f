"""Diffusion helpers shared by the DDPM, the noisy CLIP and the (guided) sampler.

- :mod:`clipdiff.diffusion.schedule` — the one noise schedule (the ``diffusion`` config group) → diffusers
  schedulers, a compatibility check between two stored schedules, eps/v/x0 conversions, min-SNR weights.
- :mod:`clipdiff.diffusion.sampling` — the batched sampling loop with a ``cond_fn`` guidance hook, and ``Sampler``
  (what ``conf/sampler/*.yaml`` instantiate).
- :mod:`clipdiff.diffusion.guidance` — CLIP guides on loaded models, the guided-eps cond_fn and the guidance settings
  (what ``conf/guidance/*.yaml`` instantiate). Composing exports is :mod:`clipdiff.pipelines`'s job.
"""
