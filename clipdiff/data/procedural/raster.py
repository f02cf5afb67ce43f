"""Camera, perspective projection and a small z-buffered polygon rasteriser with flat shading.

Conventions:

* World: **+z up** (our choice; the car's nose points to +x). Cameras sit on the upper hemisphere of radius
  :data:`CAMERA_RADIUS` (SRN cars' 1.3) and look at the origin, the centre of the car's bounding box.
* Poses are 4×4 **camera-to-world** matrices in the **OpenCV** convention: camera +x right, +y down,
  +z forward (the viewing direction). The last column is the camera centre.
* Intrinsics: focal length ``f = 131.25 · size / 128`` pixels, principal point at the image centre (SRN's
  values for 128×128 cars). Pixel (i, j) covers [j, j+1) × [i, i+1) in continuous image coordinates.

Rendering: faces are back-face culled, projected, and scan-converted at ``supersample``× resolution with an
exact per-sample depth test (1/z is affine in screen space for a planar face), then box-filtered down
(anti-aliasing). Shading is per face: ambient + Lambert from a fixed world light + a soft camera fill light,
with a small Blinn-Phong highlight for glass and paint. A soft, faint ground shadow is drawn under the car;
the background is white.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipdiff.data.procedural.geometry import PackedMesh

CAMERA_RADIUS = 1.3
FOCAL_AT_128 = 131.25
WORLD_UP = np.array([0.0, 0.0, 1.0])
LIGHT_DIR = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])  # towards the light, world frame

# Per material (geometry.BODY, GLASS, TYRE, MATTE, LAMP, METAL):
#   ambient, diffuse (world light), fill (camera light), specular, shininess
MATERIALS = np.array(
    [
        [0.50, 0.36, 0.20, 0.10, 24.0],  # body paint
        [0.55, 0.25, 0.25, 0.30, 12.0],  # glass
        [0.70, 0.20, 0.15, 0.00, 1.0],  # tyre
        [0.60, 0.30, 0.15, 0.00, 1.0],  # matte (wells, grille, interior)
        [0.90, 0.10, 0.10, 0.00, 1.0],  # lamps
        [0.45, 0.35, 0.25, 0.20, 8.0],  # metal hubs
    ]
)
SHADOW_STRENGTH = 0.11  # darkest shadow is ~ (1 - 0.11) * 255 ≈ 227


def intrinsics(image_size: int) -> tuple[float, float, float]:
    """SRN-style intrinsics ``(f, cx, cy)`` in pixels for a square image."""
    return FOCAL_AT_128 * image_size / 128.0, image_size / 2.0, image_size / 2.0


def look_at_pose(azimuth_deg: float, elevation_deg: float, radius: float = CAMERA_RADIUS) -> np.ndarray:
    """Camera-to-world 4×4 (OpenCV axes) for a camera at (azimuth, elevation, radius) looking at the origin.

    Azimuth 0° puts the camera in front of the car (+x), 90° on its left side (+y); elevation is measured up
    from the ground plane.
    """
    if not -89.0 <= elevation_deg <= 89.0:
        raise ValueError(f"elevation {elevation_deg}° is too close to a pole for a look-at camera")
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    centre = radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, WORLD_UP)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, centre
    return pose


def project(points: np.ndarray, pose: np.ndarray, focal: float, cx: float, cy: float) -> np.ndarray:
    """World points (N, 3) → pixel coordinates (N, 2) and camera depth (N,) stacked as (N, 3)."""
    cam = (points - pose[:3, 3]) @ pose[:3, :3]
    z = cam[:, 2]
    return np.stack([focal * cam[:, 0] / z + cx, focal * cam[:, 1] / z + cy, z], 1)


def shade(mesh: PackedMesh, eye: np.ndarray) -> np.ndarray:
    """Per-face RGB in [0, 1] seen from camera centre ``eye``."""
    m = MATERIALS[mesh.materials]
    n = mesh.normals
    view = eye - mesh.centroids
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    lambert = np.clip(n @ LIGHT_DIR, 0.0, None)
    fill = np.clip(np.einsum("ij,ij->i", n, view), 0.0, None)
    half = view + LIGHT_DIR
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = m[:, 3] * np.clip(np.einsum("ij,ij->i", n, half), 0.0, None) ** m[:, 4]
    intensity = m[:, 0] + m[:, 1] * lambert + m[:, 2] * fill
    return np.clip(mesh.colours * intensity[:, None] + spec[:, None], 0.0, 1.0)


def rasterise(
    mesh: PackedMesh, pose: np.ndarray, width: int, height: int, focal: float, cx: float, cy: float
) -> np.ndarray:
    """Index of the visible face per pixel sample (−1: background), with an exact z-buffer test.

    Samples sit at pixel centres. For a convex polygon every image row is one span of samples, so the spans
    of all faces and rows are computed at once from the edge functions; the per-face loop only depth-tests
    and writes its spans. 1/z is affine in screen space over a planar face, which makes the test exact.
    """
    eye = pose[:3, 3]
    rot = pose[:3, :3]
    first = mesh.vertices[mesh.starts[:-1]]
    to_eye = eye - first
    facing = np.einsum("ij,ij->i", mesh.normals, to_eye)
    vis = np.flatnonzero(facing > 1e-6 * np.linalg.norm(to_eye, axis=1))
    zbuf = np.zeros((height, width), np.float32)  # inverse depth; 0 = infinitely far
    fid = np.full((height, width), -1, np.int32)
    if len(vis) == 0:
        return fid
    proj = project(mesh.vertices, pose, focal, cx, cy)[:, :2]

    # padded polygons (V, K, 2): short polygons repeat their last corner (zero-length edges are no constraint)
    counts = mesh.starts[vis + 1] - mesh.starts[vis]
    k = int(counts.max())
    j = np.arange(k)[None, :]
    last = counts[:, None] - 1
    pts = proj[mesh.starts[vis, None] + np.minimum(j, last)]
    nxt = proj[mesh.starts[vis, None] + np.where(j < last, j + 1, np.where(j == last, 0, last))]
    ex, ey = nxt[..., 0] - pts[..., 0], nxt[..., 1] - pts[..., 1]
    area = np.sum(pts[..., 0] * nxt[..., 1] - nxt[..., 0] * pts[..., 1], axis=1)
    flip = np.where(area < 0, -1.0, 1.0)[:, None]
    ex, ey = ex * flip, ey * flip

    x_lo = np.maximum(0, np.ceil(pts[..., 0].min(1) - 0.5)).astype(np.int64)
    x_hi = np.minimum(width - 1, np.floor(pts[..., 0].max(1) - 0.5)).astype(np.int64)
    y_lo = np.maximum(0, np.ceil(pts[..., 1].min(1) - 0.5)).astype(np.int64)
    y_hi = np.minimum(height - 1, np.floor(pts[..., 1].max(1) - 0.5)).astype(np.int64)
    todo = np.flatnonzero((x_hi >= x_lo) & (y_hi >= y_lo) & (np.abs(area) > 1e-9))
    if len(todo) == 0:
        return fid

    # Row spans of every face over its own rows, all at once. With E(x, y) = ex·(y − py) − ey·(x − px),
    # a sample is inside when A(y) − ey·x ≥ 0 for every edge (A(y) = ex·(y − py) + ey·px).
    heights = y_hi[todo] - y_lo[todo] + 1
    offsets = np.concatenate([[0], np.cumsum(heights)])
    owner = np.repeat(todo, heights)  # face (position in vis) of each span row
    row = np.arange(offsets[-1]) - np.repeat(offsets[:-1], heights) + np.repeat(y_lo[todo], heights)
    ys = row + 0.5
    tol = 1e-6 * np.hypot(ex, ey)
    e_x, e_y = ex[owner], ey[owner]  # (R, K)
    a = e_x * (ys[:, None] - pts[owner, :, 1]) + (ey * pts[..., 0] + tol)[owner]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = a / e_y
    lo = np.where(e_y < 0, bound, -np.inf).max(axis=1)
    hi = np.where(e_y > 0, bound, np.inf).min(axis=1)
    hi[((e_y == 0) & (a < 0)).any(axis=1)] = -np.inf
    first_col = np.clip(np.ceil(lo - 0.5), 0, width).astype(np.int32)
    last_col = np.clip(np.floor(hi - 0.5), -1, width - 1).astype(np.int32)

    # 1/z = pa·x + pb·y + pc (camera frame: plane n_c · X = d with X = z·ray(x, y))
    n_cam = mesh.normals[vis] @ rot
    d = np.einsum("ij,ij->i", n_cam, (first[vis] - eye) @ rot)
    pa = n_cam[:, 0] / focal / d
    pb = n_cam[:, 1] / focal / d
    pc = (n_cam[:, 2] - n_cam[:, 0] * cx / focal - n_cam[:, 1] * cy / focal) / d
    row_term = (pb[owner] * ys + pc[owner]).astype(np.float32)
    xs = np.arange(width, dtype=np.float64) + 0.5
    cols = np.arange(width, dtype=np.int32)
    for n, i in enumerate(todo):
        y0, y1, x0, x1 = y_lo[i], y_hi[i] + 1, x_lo[i], x_hi[i] + 1
        r0, r1 = offsets[n], offsets[n + 1]
        c = cols[x0:x1]
        inside = (c >= first_col[r0:r1, None]) & (c <= last_col[r0:r1, None])
        invz = row_term[r0:r1, None] + (pa[i] * xs[x0:x1]).astype(np.float32)
        zsub = zbuf[y0:y1, x0:x1]
        inside &= invz > zsub
        np.copyto(zsub, invz, where=inside)
        np.copyto(fid[y0:y1, x0:x1], np.int32(vis[i]), where=inside)
    return fid


def ground_shadow(
    mesh: PackedMesh, pose: np.ndarray, size: int, focal: float, cx: float, cy: float
) -> np.ndarray:
    """A soft shadow under the car: the footprint on the ground, projected and blurred; values in [0, 1]."""
    x0, x1, y0, y1 = mesh.footprint
    mx, my = 0.03 * (x1 - x0), 0.05 * (y1 - y0)
    corners = np.array([[x0 - mx, y0 - my], [x1 + mx, y0 - my], [x1 + mx, y1 + my], [x0 - mx, y1 + my]])
    ground = np.concatenate([corners, np.full((4, 1), mesh.ground_z)], 1)
    uv = project(ground, pose, focal, cx, cy)[:, :2]
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in uv.tolist()], fill=255)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1.0, 0.035 * size)))
    return np.asarray(img, dtype=np.float32) / 255.0


def render_mesh(
    mesh: PackedMesh, pose: np.ndarray, image_size: int, supersample: int = 3, shadow: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render one view: ``(rgb uint8 [S, S, 3] on white, coverage float32 [S, S] of the car in [0, 1])``."""
    ss = int(supersample)
    focal, cx, cy = intrinsics(image_size)
    big = image_size * ss
    fid = rasterise(mesh, pose, big, big, focal * ss, cx * ss, cy * ss)
    # palette of RGB + coverage bytes (entry 0: white background, coverage 0), one uint32 per sample
    palette = np.empty((len(mesh.normals) + 1, 4), np.uint8)
    palette[0] = (255, 255, 255, 0)
    palette[1:, :3] = np.rint(shade(mesh, pose[:3, 3]) * 255.0)
    palette[1:, 3] = 255
    samples = np.take(palette.view(np.uint32).ravel(), fid + 1)
    # box filter over ss × ss samples (RGBX: channels averaged independently, no alpha premultiplication)
    small = Image.frombuffer("RGBX", (big, big), samples, "raw", "RGBX", 0, 1).reduce(ss)
    arr = np.asarray(small)
    alpha = arr[..., 3].astype(np.float32) / 255.0
    if not shadow:
        return np.ascontiguousarray(arr[..., :3]), alpha
    dark = (SHADOW_STRENGTH * 255.0) * ground_shadow(mesh, pose, image_size, focal, cx, cy) * (1.0 - alpha)
    rgb = np.clip(arr[..., :3] - dark[..., None] + 0.5, 0, 255).astype(np.uint8)
    return rgb, alpha
