"""clipdiff: steer a diffusion model with (noisy) CLIP to draw the car you ask for."""

from clipdiff.utils.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
