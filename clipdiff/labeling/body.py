"""Body type from silhouettes over several posed views.

The car's axes come from a coarse visual hull carved from the views (up from the cameras, length from the
hull's footprint). Each view seen from the side is then measured along the car's projected length: the
roof line (silhouette top per station), where the glass is (cabin extent: trunk, bed, van body), dark
openings at the top (open cockpits, load beds) and the body's bottom above the ground (clearance). Front
views add the height/width of the silhouette. A logistic regression over these proportions (fit on rendered
sets with known types, :func:`fit_body_model`) gives log p(type | views).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Camera:
    pose: np.ndarray  # 4×4 camera-to-world, OpenCV axes (x right, y down, z forward)
    focal: float
    cx: float
    cy: float


def up_from_poses(poses: list[np.ndarray]) -> np.ndarray:
    """World up: the direction every (upright) camera's x axis is orthogonal to, pointing to the cameras' side."""
    if len(poses) < 2:
        return np.array([0.0, 0.0, 1.0])
    rights = np.stack([p[:3, 0] for p in poses])
    _, s, vt = np.linalg.svd(rights)
    up = vt[-1]
    if s[-1] > 0.5 * s[0]:  # cameras do not pin the up axis down (e.g. rolled): keep the convention
        return np.array([0.0, 0.0, 1.0])
    centres = np.stack([p[:3, 3] for p in poses])
    if centres.mean(0) @ up < 0:
        up = -up
    return up / np.linalg.norm(up)


def carve_points(points: np.ndarray, masks: list[np.ndarray], cams: list[Camera], tolerance: int = 0) -> np.ndarray:
    """Which world points (N, 3) survive carving: a point is dropped once more than ``tolerance`` views see
    background at its projection (a point projecting outside an image counts as background: objects are in
    frame). Views are applied one after another to the survivors only, so each costs less than the last."""
    px, py, pz = (np.ascontiguousarray(points[:, k]) for k in range(3))
    idx = np.arange(len(points))
    misses = np.zeros(len(points), dtype=np.int16)
    for mask, cam in zip(masks, cams):
        if len(idx) == 0:
            break
        rot, eye = cam.pose[:3, :3], cam.pose[:3, 3]
        x, y, z = px[idx] - eye[0], py[idx] - eye[1], pz[idx] - eye[2]
        # camera coordinates (rot.T @ p), written out: (N, 3) @ (3, 3) is far slower in numpy
        cx = x * rot[0, 0] + y * rot[1, 0] + z * rot[2, 0]
        cy = x * rot[0, 1] + y * rot[1, 1] + z * rot[2, 1]
        cz = np.maximum(x * rot[0, 2] + y * rot[1, 2] + z * rot[2, 2], 1e-6)
        u = np.floor(cam.focal * cx / cz + cam.cx).astype(np.int64)
        v = np.floor(cam.focal * cy / cz + cam.cy).astype(np.int64)
        h, w = mask.shape
        inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
        hit = mask.ravel()[np.where(inside, v * w + u, 0)] & inside
        misses[idx[~hit]] += 1
        idx = idx[misses[idx] <= tolerance]
    keep = np.zeros(len(points), dtype=bool)
    keep[idx] = True
    return keep


def grid_points(axes: np.ndarray, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """World points of the grid ``x·a0 + y·a1 + z·a2`` in (x, y, z) C order, as (N, 3)."""
    gx, gy, gz = (g.ravel() for g in np.meshgrid(xs, ys, zs, indexing="ij"))
    return np.stack([gx * axes[0, k] + gy * axes[1, k] + gz * axes[2, k] for k in range(3)], 1)


def dilate(mask: np.ndarray) -> np.ndarray:
    """One-pixel 4-neighbour dilation (keeps thin parts from being carved away by anti-aliasing)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _frame(up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two horizontal unit axes completing ``up`` (the first as close to world x as possible)."""
    e1 = np.array([1.0, 0.0, 0.0]) - up * up[0]
    if np.linalg.norm(e1) < 0.5:
        e1 = np.array([0.0, 1.0, 0.0]) - up * up[1]
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(up, e1)


def project(points: np.ndarray, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) → pixel coordinates (u, v) (continuous, pixel centres at +0.5)."""
    rot, eye = cam.pose[:3, :3], cam.pose[:3, 3]
    d = points - eye
    c = [d[:, 0] * rot[0, k] + d[:, 1] * rot[1, k] + d[:, 2] * rot[2, k] for k in range(3)]
    z = np.maximum(c[2], 1e-6)
    return cam.focal * c[0] / z + cam.cx, cam.focal * c[1] / z + cam.cy


def car_axes(masks: list[np.ndarray], cams: list[Camera], coarse: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """(3, 3) axes of the car (rows: length, width, up) from a coarse visual hull, and its centre."""
    up = up_from_poses([c.pose for c in cams])
    e1, e2 = _frame(up)
    radius = float(np.median([np.linalg.norm(c.pose[:3, 3]) for c in cams]))
    half = 0.46 * radius
    g = np.arange(-half, half + 1e-9, coarse)
    base = np.stack([e1, e2, up])
    tol = 1 if len(masks) >= 5 else 0
    occ = carve_points(grid_points(base, g, g, g), [dilate(m) for m in masks], cams, tol).reshape(len(g), len(g), len(g))
    if occ.sum() < 8:
        return base, np.zeros(3)
    ix, iy, _ = np.nonzero(occ)
    pts = np.stack([g[ix], g[iy]], 1)
    centre2 = pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov(pts.T))
    major = vecs[:, -1]
    a0 = major[0] * e1 + major[1] * e2
    a0 /= np.linalg.norm(a0)
    return np.stack([a0, np.cross(up, a0), up]), centre2[0] * e1 + centre2[1] * e2


BINS = 12  # stations along the car's length in side views


@dataclass
class SideView:
    """Measurements of one view taken from the side (the car's length across the image)."""

    sideness: float  # |sin| of the angle between the viewing direction and the car's length, on the ground
    elevation: float  # degrees above the ground plane
    aspect: float  # silhouette height / length in the image
    top: np.ndarray  # (BINS,) silhouette top per station, as a fraction of the silhouette height; low end first
    glass: np.ndarray  # (BINS,) share of each station's pixels that are glass
    dark_top: np.ndarray  # (BINS,) share of each station's upper-half pixels that are dark (interiors, beds)
    bottom: np.ndarray  # (BINS,) lowest paint pixel per station above the silhouette bottom, fraction of height


def side_view(classes: np.ndarray, cam: Camera, axes: np.ndarray, centre: np.ndarray) -> SideView | None:
    """Silhouette profile of one view along the car's projected length (None when too little is seen)."""
    from clipdiff.labeling.colour import BG, DARK, GLASS, OTHER, TYRE_LIKE

    up = axes[2]
    fwd = cam.pose[:3, 2]
    fh = fwd - (fwd @ up) * up
    norm = np.linalg.norm(fh)
    if norm < 1e-6:
        return None
    fh /= norm
    sideness = float(abs(np.cross(fh, axes[0]) @ up))
    eye = cam.pose[:3, 3] - centre
    elevation = float(np.degrees(np.arcsin(np.clip(eye @ up / np.linalg.norm(eye), -1, 1))))
    u, v = project(np.stack([centre - 0.3 * axes[0], centre + 0.3 * axes[0], centre + 0.2 * up]), cam)
    d = np.array([u[1] - u[0], v[1] - v[0]])
    if np.linalg.norm(d) < 1e-3:
        return None
    d /= np.linalg.norm(d)
    n = np.array([-d[1], d[0]])
    if n @ np.array([u[2] - (u[0] + u[1]) / 2, v[2] - (v[0] + v[1]) / 2]) < 0:
        n = -n  # image direction of "up"
    ys, xs = np.nonzero(classes != BG)
    if len(ys) < 50:
        return None
    t = xs * d[0] + ys * d[1]
    h = xs * n[0] + ys * n[1]
    t0, t1 = np.percentile(t, [0.5, 99.5])
    h0, h1 = np.percentile(h, [0.5, 99.5])
    if t1 - t0 < 5 or h1 - h0 < 3:
        return None
    b = np.clip(((t - t0) / (t1 - t0) * BINS).astype(np.int64), 0, BINS - 1)
    hn = (h - h0) / (h1 - h0)
    c = classes[ys, xs]
    top = np.full(BINS, 0.0)
    np.maximum.at(top, b, hn)
    count = np.bincount(b, minlength=BINS).astype(np.float64)
    glass = np.bincount(b, weights=(c == GLASS), minlength=BINS) / np.maximum(count, 1)
    upper = hn > 0.5
    dark = (c == DARK) | (c == OTHER)
    dark_top = np.bincount(b, weights=upper & dark, minlength=BINS) / np.maximum(np.bincount(b, weights=upper, minlength=BINS), 1)
    paint = ~np.isin(c, TYRE_LIKE)
    bottom = np.full(BINS, 1.0)
    np.minimum.at(bottom, b[paint], hn[paint])
    if top[: BINS // 4].mean() > top[-(BINS // 4):].mean():  # low end first
        top, glass, dark_top, bottom = top[::-1], glass[::-1], dark_top[::-1], bottom[::-1]
    return SideView(sideness, elevation, float((h1 - h0) / (t1 - t0)), top, glass, dark_top, bottom)


def _bbox_aspect(classes: np.ndarray) -> float:
    from clipdiff.labeling.colour import BG

    rows = np.flatnonzero((classes != BG).any(1))
    cols = np.flatnonzero((classes != BG).any(0))
    if len(rows) < 2 or len(cols) < 2:
        return 0.0
    return float((rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1))


def body_features(classes: list[np.ndarray], cams: list[Camera], masks: list[np.ndarray]) -> np.ndarray | None:
    """Fixed-length feature vector of one object: side-view profiles (roof line, glass along the length,
    dark openings at the top, body bottom above the ground) averaged over side-on views, plus the
    height/width of front-on silhouettes and glass/dark shares (None when no view shows the car)."""
    from clipdiff.labeling.colour import BG, DARK, GLASS

    axes, centre = car_axes(masks, cams)
    views = [side_view(c, cam, axes, centre) for c, cam in zip(classes, cams)]
    ok = [(v, c) for v, c in zip(views, classes) if v is not None]
    if not ok:
        return None
    best = max(v.sideness for v, _ in ok)
    side = [v for v, _ in ok if v.sideness >= min(0.7, best)]
    w = np.array([v.sideness ** 2 * np.cos(np.radians(v.elevation)) for v in side]) + 1e-6
    w /= w.sum()

    def avg(f):
        return sum(wi * np.asarray(getattr(v, f), dtype=np.float64) for wi, v in zip(w, side))

    front = [(v, c) for v, c in ok if v.sideness <= 0.5]
    front_aspect = np.mean([_bbox_aspect(c) for _, c in front]) if front else 0.0
    px = np.concatenate([c[c != BG] for _, c in ok])
    n = max(len(px), 1)
    glass, dark = np.count_nonzero(px == GLASS) / n, np.count_nonzero(px == DARK) / n
    low_elev = min(v.elevation for v in side)
    return np.concatenate([
        avg("top"), avg("glass"), avg("dark_top"), avg("bottom"),
        [avg("aspect"), np.cos(np.radians(low_elev)), front_aspect, float(bool(front)), glass, dark],
    ])


# ---------------------------------------------------------------------------------------------------------
# Body type: a multinomial logistic regression over body_features, fit on rendered sets with ground truth
# (python -m clipdiff.labeling.fit_body) and shipped as body_model.json next to this module.

MODEL_FILE = "body_model.json"


@dataclass
class BodyModel:
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (features, classes)
    bias: np.ndarray
    info: dict

    def log_probs(self, features: np.ndarray) -> np.ndarray:
        """log p(type | features) per class (features: (F,) or (N, F))."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        logits = z @ self.weights + self.bias
        logits = logits - logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def to_json(self) -> dict:
        return {"classes": self.classes, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias.tolist(), "info": self.info}

    @classmethod
    def from_json(cls, d: dict) -> BodyModel:
        return cls(list(d["classes"]), np.asarray(d["mean"]), np.asarray(d["scale"]), np.asarray(d["weights"]),
                   np.asarray(d["bias"]), dict(d.get("info", {})))


def load_body_model(path: str | None = None) -> BodyModel:
    import json
    from importlib import resources

    from clipdiff.errors import ClipdiffError

    try:
        if path:
            text = Path(path).read_text(encoding="utf-8")
        else:
            text = resources.files("clipdiff.labeling").joinpath(MODEL_FILE).read_text(encoding="utf-8")
        return BodyModel.from_json(json.loads(text))
    except (OSError, ValueError, KeyError) as e:
        raise ClipdiffError(f"body model {path or MODEL_FILE} is not readable ({e}); refit it with "
                            "`python -m clipdiff.labeling.fit_body`") from None


def fit_body_model(x: np.ndarray, y: np.ndarray, classes: list[str], l2: float = 1e-2, iters: int = 3000,
                   lr: float = 0.05, info: dict | None = None) -> BodyModel:
    """Fit the logistic regression with class-balanced weights (full-batch Adam on standardised features)."""
    x = np.asarray(x, dtype=np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    k = len(classes)
    onehot = np.eye(k)[y]
    counts = np.bincount(y, minlength=k).astype(np.float64)
    sw = (len(y) / (k * np.maximum(counts, 1)))[y][:, None]  # every class weighs the same
    w, b = np.zeros((z.shape[1], k)), np.zeros(k)
    state = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    for t in range(1, iters + 1):
        logits = z @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = sw * (p - onehot) / len(z)
        grads = (z.T @ g + l2 * w, g.sum(0))
        for i, (param, grad) in enumerate(zip((w, b), grads)):
            m, v = state[2 * i], state[2 * i + 1]
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            param -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return BodyModel(list(classes), mean, scale, w, b, dict(info or {}))
