"""Training-time metrics that the LightningModules log: zero-shot caption metrics of a CLIP
(:mod:`~clipdiff.models.metrics.zeroshot`) and noisy-classifier accuracy/calibration per timestep bucket
(:mod:`~clipdiff.models.metrics.noisy`). Offline tools (FD/KID, the report) live in :mod:`clipdiff.eval`, above.
"""
