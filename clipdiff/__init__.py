"""clipdiff: steer a diffusion model with (noisy) CLIP to draw the car you ask for."""

from clipdiff.utils.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"


def __getattr__(name: str):
    """``clipdiff.GuidedPipeline``, imported on first use (it pulls in torch, diffusers and open_clip)."""
    if name == "GuidedPipeline":
        from clipdiff.pipelines.guided import GuidedPipeline

        return GuidedPipeline
    raise AttributeError(f"module 'clipdiff' has no attribute {name!r}")
