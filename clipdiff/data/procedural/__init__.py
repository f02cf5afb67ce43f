"""The built-in procedural car set: ShapeNet-like cars rendered in the SRN cars layout, with ground truth.

Real ShapeNet cars cannot be downloaded everywhere, so this synthetic set is the project's default data
(demo and tests). ``python -m clipdiff.render out_dir=DIR`` writes it; :func:`render_dataset` is the API.

* :mod:`.geometry` — car meshes per body type from sampled proportions and paint (world +z up).
* :mod:`.raster` — camera (OpenCV camera-to-world poses, SRN intrinsics), z-buffered polygon rasteriser,
  flat shading, supersampled anti-aliasing, soft ground shadow.
* :mod:`.generate` — object specs (captions from the original prior, splits, ids), parallel writing,
  completion marker, reuse/resume/refusal of an existing ``out_dir``.
"""

from clipdiff.data.procedural.generate import (
    DEFAULT_SPLITS,
    GROUND_TRUTH,
    MARKER,
    ObjectSpec,
    RenderConfig,
    RenderResult,
    caption_distribution,
    object_id,
    read_ground_truth,
    read_render_config,
    render_dataset,
    render_object,
    sample_specs,
    split_counts,
    view_angles,
)
from clipdiff.data.procedural.geometry import Mesh, PackedMesh, build_car, sample_paint
from clipdiff.data.procedural.raster import CAMERA_RADIUS, intrinsics, look_at_pose, render_mesh

__all__ = [
    "CAMERA_RADIUS",
    "DEFAULT_SPLITS",
    "GROUND_TRUTH",
    "MARKER",
    "Mesh",
    "ObjectSpec",
    "PackedMesh",
    "RenderConfig",
    "RenderResult",
    "build_car",
    "caption_distribution",
    "intrinsics",
    "look_at_pose",
    "object_id",
    "read_ground_truth",
    "read_render_config",
    "render_dataset",
    "render_mesh",
    "render_object",
    "sample_paint",
    "sample_specs",
    "split_counts",
    "view_angles",
]
