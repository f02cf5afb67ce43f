"""Pipelines: trained parts composed into objects that draw images (between the entry points and the models).

:class:`~clipdiff.pipelines.guided.GuidedPipeline` — a DDPM and its CLIP guides, loaded and checked once.
"""
