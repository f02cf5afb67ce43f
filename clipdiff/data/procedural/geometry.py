"""Car meshes per body type, built from sampled proportions as a list of flat-shaded convex parts.

World frame (metres while building, then normalised): **+z is up**, +x points to the car's nose, +y to the
car's left; the wheels stand on the ground plane. :func:`build_car` normalises the mesh like ShapeNet: the
bounding box is centred on the origin, its diagonal is :data:`DIAGONAL` (1.12: a little above ShapeNet's 1, so
the car fills about 3/4 of an SRN-style frame), and the ground is the plane z = ``mesh.ground_z`` (< 0).

Every part is a convex polyhedron (extruded side profiles, boxes, cylinders). Windows, lights, grilles,
wheel wells, hub caps and the cockpit of the open car are *decals*: flat polygons lying a hair in front of
the face they belong to (the z-buffer of :mod:`.raster` draws them over that face).

Paint: a caption with one colour paints the whole body in it. A two-tone caption ``"a X and Y <type>"``
paints the car in **X, the dominant colour**, with **accents in Y** that show from every viewpoint:

* every type: a shoulder band along the flanks (above ~3/4 of the body height; the hood and boot above it
  stay X);
* car, sports car: also the cabin pillars and roof (and the sports car's wing);
* jeep/bus, van, truck: also a wide stripe down the middle of hood and roof (and of a box truck's box);
* open car (no roof): also the windshield frame and a racing stripe over hood and rear deck.

Tyres (near black), glass (dark tinted), lights, wheel wells and interior are not paint.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clipdiff.data.vocab import BODY_TYPES, COLOURS
from clipdiff.errors import ClipdiffError

# Materials (indices into raster.MATERIALS): how a face reacts to light.
BODY, GLASS, TYRE, MATTE, LAMP, METAL = range(6)

# Fixed (non-paint) colours, linear-ish RGB in [0, 1].
TYRE_RGB = (0.075, 0.075, 0.08)
WELL_RGB = (0.05, 0.05, 0.055)
GLASS_RGB = (0.16, 0.2, 0.26)
HUB_RGB = (0.62, 0.63, 0.65)
GRILLE_RGB = (0.10, 0.10, 0.11)
HEADLIGHT_RGB = (0.93, 0.93, 0.86)
TAILLIGHT_RGB = (0.55, 0.06, 0.06)
BED_RGB = (0.17, 0.17, 0.18)
INTERIOR_RGBS = ((0.13, 0.13, 0.14), (0.24, 0.15, 0.10), (0.20, 0.20, 0.22))

DECAL_OFFSET = 0.006  # metres in front of the parent face
# Bottom of the shoulder band (second colour of a two-tone), as a fraction of the body's height above its
# bottom edge; the band's upward faces (hood, boot) keep the first colour.
WAIST = (0.72, 0.8)
OPEN_WAIST = (0.6, 0.7)  # open car: a wider band
DIAGONAL = 1.12  # bounding-box diagonal of a finished mesh (the car fills ~3/4 of an SRN-style frame)

# Paint jitter in HSV: hue (None: any; the saturation is tiny), saturation, value ranges per colour name.
# The ranges keep names unambiguous: white is bright and nearly unsaturated, gray is mid and unsaturated,
# black is very dark, yellow is bright and saturated at hue ~0.14 (green sits at ~0.33, red at ~0.0).
PAINT_HSV: dict[str, tuple[tuple[float, float] | None, tuple[float, float], tuple[float, float]]] = {
    "white": (None, (0.0, 0.03), (0.93, 0.99)),
    "gray": (None, (0.0, 0.04), (0.46, 0.58)),
    "black": (None, (0.0, 0.08), (0.07, 0.13)),
    "red": ((-0.015, 0.012), (0.78, 0.95), (0.70, 0.90)),
    "blue": ((0.585, 0.64), (0.70, 0.90), (0.55, 0.82)),
    "green": ((0.29, 0.37), (0.60, 0.85), (0.45, 0.68)),
    "yellow": ((0.13, 0.155), (0.80, 0.95), (0.90, 0.99)),
}


def sample_paint(name: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """One RGB paint colour (floats in [0, 1]) for a colour name, jittered within its unambiguous range."""
    try:
        hue, sat, val = PAINT_HSV[name]
    except KeyError:
        raise ClipdiffError(f"unknown paint colour {name!r} (known: {', '.join(COLOURS)})") from None
    h = rng.uniform(0.0, 1.0) if hue is None else rng.uniform(*hue) % 1.0
    return colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))


# ---------------------------------------------------------------------------------------------------------
# Mesh containers


@dataclass
class Face:
    points: np.ndarray  # (k, 3) convex planar polygon
    normal: np.ndarray  # (3,) outward unit normal
    colour: tuple[float, float, float]
    material: int


@dataclass
class Solid:
    """A convex polyhedron: its faces, used as handles for decals and as half-spaces for clipping."""

    faces: list[Face]

    def face_towards(self, direction: Sequence[float]) -> Face:
        d = np.asarray(direction, dtype=np.float64)
        return max(self.faces, key=lambda f: float(f.normal @ d))


@dataclass
class PackedMesh:
    """Faces as flat arrays, ready for :func:`clipdiff.data.procedural.raster.render_mesh`."""

    vertices: np.ndarray  # (M, 3) all polygon corners, face after face
    starts: np.ndarray  # (F + 1,) face i is vertices[starts[i]:starts[i + 1]]
    normals: np.ndarray  # (F, 3)
    colours: np.ndarray  # (F, 3)
    materials: np.ndarray  # (F,)
    centroids: np.ndarray  # (F, 3)
    ground_z: float
    footprint: tuple[float, float, float, float]  # x0, x1, y0, y1 of the car on the ground


@dataclass
class Mesh:
    faces: list[Face] = field(default_factory=list)
    ground_z: float = 0.0
    footprint: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        pts = np.concatenate([f.points for f in self.faces])
        return pts.min(0), pts.max(0)

    def pack(self) -> PackedMesh:
        sizes = [len(f.points) for f in self.faces]
        return PackedMesh(
            vertices=np.concatenate([f.points for f in self.faces]).astype(np.float64),
            starts=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            normals=np.stack([f.normal for f in self.faces]),
            colours=np.asarray([f.colour for f in self.faces], dtype=np.float64),
            materials=np.asarray([f.material for f in self.faces], dtype=np.int64),
            centroids=np.stack([f.points.mean(0) for f in self.faces]),
            ground_z=self.ground_z,
            footprint=self.footprint,
        )


# ---------------------------------------------------------------------------------------------------------
# Polygon helpers


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _newell(points: np.ndarray) -> np.ndarray:
    n = np.zeros(3)
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        n += np.array(
            [(a[1] - b[1]) * (a[2] + b[2]), (a[2] - b[2]) * (a[0] + b[0]), (a[0] - b[0]) * (a[1] + b[1])]
        )
    return _unit(n)


def hull2d(points: Sequence[Sequence[float]]) -> np.ndarray:
    """Convex hull (counter-clockwise, no collinear points) of 2-D points: profiles are always convex."""
    pts = sorted({(round(float(x), 9), round(float(y), 9)) for x, y in points})

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 1e-12:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 1e-12:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def clip_polygon(poly: np.ndarray, a: np.ndarray, b: float) -> np.ndarray:
    """Sutherland-Hodgman: keep the part of a convex 3-D polygon where ``a . p <= b``."""
    if len(poly) == 0:
        return poly
    s = poly @ a - b
    out = []
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if s[i] <= 0:
            out.append(poly[i])
        if (s[i] < 0) != (s[j] < 0) and s[i] != s[j]:
            t = s[i] / (s[i] - s[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.asarray(out).reshape(-1, 3)


def inset_polygon(poly: np.ndarray, normal: np.ndarray, margin: float) -> np.ndarray:
    """Shrink a convex planar polygon by ``margin`` from every edge (empty when nothing is left)."""
    centre = poly.mean(0)
    out = poly
    for p, q in zip(poly, np.roll(poly, -1, axis=0)):
        edge = q - p
        if np.linalg.norm(edge) < 1e-9:
            continue
        m = _unit(np.cross(normal, edge))  # in-plane, perpendicular to the edge
        if m @ (centre - p) < 0:
            m = -m
        out = clip_polygon(out, -m, -(m @ p + margin))  # keep m . x >= m . p + margin
        if len(out) < 3:
            return np.zeros((0, 3))
    return out


def circle(centre: np.ndarray, u: np.ndarray, v: np.ndarray, radius: float, n: int) -> np.ndarray:
    t = (np.arange(n) + 0.5) * (2 * np.pi / n)
    return centre + radius * (np.cos(t)[:, None] * u + np.sin(t)[:, None] * v)


# ---------------------------------------------------------------------------------------------------------
# Builder


class CarBuilder:
    """Collects convex parts and decals (in metres) and normalises them into a :class:`Mesh`."""

    def __init__(self) -> None:
        self.faces: list[Face] = []

    def solid(
        self, polys: list[np.ndarray], colour, material: int = BODY, colours: dict | None = None
    ) -> Solid:
        """A convex polyhedron from its face polygons; normals are oriented away from its centroid."""
        centre = np.concatenate(polys).mean(0)
        faces = []
        for k, poly in enumerate(polys):
            n = _newell(poly)
            if n @ (poly.mean(0) - centre) < 0:
                n = -n
            faces.append(Face(poly, n, tuple(colour), material))
        self.faces += faces
        return Solid(faces)

    def prism(
        self,
        profile,
        half_bottom: float,
        half_top: float | None = None,
        colour=(1, 1, 1),
        material: int = BODY,
        y_centre: float = 0.0,
    ) -> Solid:
        """Extrude a convex (x, z) side profile along y; the half-width may taper linearly with height."""
        prof = hull2d(profile)
        half_top = half_bottom if half_top is None else half_top
        z0, z1 = prof[:, 1].min(), prof[:, 1].max()
        half = half_bottom + (half_top - half_bottom) * (prof[:, 1] - z0) / max(z1 - z0, 1e-9)
        left = np.stack([prof[:, 0], y_centre + half, prof[:, 1]], 1)
        right = np.stack([prof[:, 0], y_centre - half, prof[:, 1]], 1)
        polys = [left, right[::-1]]
        for i in range(len(prof)):
            j = (i + 1) % len(prof)
            polys.append(np.stack([left[i], left[j], right[j], right[i]]))
        return self.solid(polys, colour, material)

    def box(self, x0, x1, y0, y1, z0, z1, colour, material: int = BODY) -> Solid:
        return self.prism(
            [(x0, z0), (x1, z0), (x1, z1), (x0, z1)],
            (y1 - y0) / 2,
            colour=colour,
            material=material,
            y_centre=(y0 + y1) / 2,
        )

    def cylinder(
        self,
        centre,
        axis,
        radius: float,
        length: float,
        n: int,
        colour,
        material: int = TYRE,
        cap_colour=None,
    ) -> Solid:
        centre, axis = np.asarray(centre, float), _unit(np.asarray(axis, float))
        u = _unit(np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0]))
        v = np.cross(axis, u)
        ring = circle(np.zeros(3), u, v, radius, n)
        a, b = centre + ring - axis * length / 2, centre + ring + axis * length / 2
        polys = [a[::-1], b] + [np.stack([a[i], a[(i + 1) % n], b[(i + 1) % n], b[i]]) for i in range(n)]
        solid = self.solid(polys, colour, material)
        if cap_colour is not None:
            solid.faces[0].colour = solid.faces[1].colour = tuple(cap_colour)
        return solid

    def decal(self, poly: np.ndarray, parent: Face, colour, material: int) -> None:
        if len(poly) >= 3:
            self.faces.append(
                Face(poly + parent.normal * DECAL_OFFSET, parent.normal, tuple(colour), material)
            )

    def inset_decal(self, parent: Face, margin: float, colour, material: int, cuts=()) -> None:
        """A decal filling ``parent`` less a margin, optionally cut by half-spaces ``(a, b)``: a . p <= b."""
        poly = inset_polygon(parent.points, parent.normal, margin)
        for a, b in cuts:
            poly = clip_polygon(poly, np.asarray(a, float), b)
        self.decal(poly, parent, colour, material)

    def clipped_decal(self, poly: np.ndarray, solid: Solid, parent: Face, colour, material: int) -> None:
        """A decal on ``parent`` limited to the face (clipped by the solid's other faces)."""
        for f in solid.faces:
            if f is parent or f.normal @ parent.normal > 0.999:
                continue
            poly = clip_polygon(poly, f.normal, float(f.normal @ f.points[0]))
            if len(poly) < 3:
                return
        self.decal(poly, parent, colour, material)

    def rect_decal(
        self,
        parent: Face,
        centre,
        half_u: float,
        half_v: float,
        u_dir,
        colour,
        material: int,
        solid: Solid | None = None,
    ) -> None:
        """A rectangle on ``parent`` (``u_dir`` in its plane), optionally clipped to the face of ``solid``."""
        n = parent.normal
        u = _unit(np.asarray(u_dir, float) - n * (n @ np.asarray(u_dir, float)))
        v = np.cross(n, u)
        c = np.asarray(centre, float)
        c = c - n * (n @ (c - parent.points[0]))
        poly = np.stack(
            [
                c - half_u * u - half_v * v,
                c + half_u * u - half_v * v,
                c + half_u * u + half_v * v,
                c - half_u * u + half_v * v,
            ]
        )
        if solid is None:
            self.decal(poly, parent, colour, material)
        else:
            self.clipped_decal(poly, solid, parent, colour, material)

    def finish(self, footprint: tuple[float, float, float, float]) -> Mesh:
        """Centre the bounding box on the origin and scale its diagonal to :data:`DIAGONAL`."""
        pts = np.concatenate([f.points for f in self.faces])
        lo, hi = pts.min(0), pts.max(0)
        centre, scale = (lo + hi) / 2, DIAGONAL / float(np.linalg.norm(hi - lo))
        faces = [Face((f.points - centre) * scale, f.normal, f.colour, f.material) for f in self.faces]
        x0, x1, y0, y1 = footprint
        fp = (
            (x0 - centre[0]) * scale,
            (x1 - centre[0]) * scale,
            (y0 - centre[1]) * scale,
            (y1 - centre[1]) * scale,
        )
        return Mesh(faces, ground_z=float(-centre[2] * scale), footprint=fp)


# ---------------------------------------------------------------------------------------------------------
# Shared parts


@dataclass
class Paint:
    body: tuple[float, float, float]  # first colour
    accent: tuple[float, float, float]  # second colour (the same as body for a one-colour caption)

    @property
    def two_tone(self) -> bool:
        return self.accent != self.body


def _lower_body(b: CarBuilder, profile, half: float, z_split: float, lower, band, tops=None) -> list[Solid]:
    """The body below the windows, cut at ``z_split`` into a lower part and an upper band.

    ``tops`` (default: ``band``) paints the band's upward faces (hood, boot or deck), the rest of the band
    (shoulders, nose and tail above the split) takes ``band``.
    """
    prof = hull2d(profile)
    pieces = []
    for sign, colour in ((1.0, lower), (-1.0, band)):
        poly = np.stack([prof[:, 0], np.zeros(len(prof)), prof[:, 1]], 1)
        poly = clip_polygon(poly, np.array([0.0, 0.0, sign]), sign * z_split)
        pieces.append(b.prism(poly[:, [0, 2]], half, colour=colour))
    if tops is not None:
        for face in pieces[1].faces:
            if face.normal[2] > 0.5:
                face.colour = tuple(tops)
    return pieces


def _wheels(
    b: CarBuilder, xs, radius: float, width: float, half: float, body: list[Solid], rng: np.random.Generator
) -> None:
    """Four tyres (slightly proud of the body side) with hub caps, and dark wheel wells on the body sides."""
    n = 16
    hub = HUB_RGB if rng.uniform() < 0.75 else (0.2, 0.2, 0.22)
    hub_r = radius * rng.uniform(0.5, 0.62)
    for x in xs:
        for side in (1.0, -1.0):
            y = side * (half + 0.015 - width / 2)
            tyre = b.cylinder((x, y, radius), (0, 1, 0), radius, width, n, TYRE_RGB, TYRE)
            outer = tyre.face_towards((0, side, 0))
            c = np.array([x, side * (half + 0.015), radius])
            b.decal(circle(c, np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), hub_r, 12), outer, hub, METAL)
            for piece in body:
                face = piece.face_towards((0, side, 0))
                well = circle(
                    np.array([x, 0.0, radius]),
                    np.array([1.0, 0, 0]),
                    np.array([0, 0, 1.0]),
                    radius * 1.13,
                    20,
                )
                well[:, 1] = side * half  # project onto the (vertical) side plane
                b.clipped_decal(well, piece, face, WELL_RGB, MATTE)


def _front_and_rear(
    b: CarBuilder, body: list[Solid], half: float, z_lamp: float, lamp_h: float, grille: bool = True
) -> None:
    """Headlights, a grille and tail lights on the vertical front and rear faces of the body pieces."""
    for piece in body:
        front = piece.face_towards((1, 0, 0))
        if front.normal[0] > 0.95:
            x = front.points[:, 0].max()
            for s in (1, -1):
                b.rect_decal(
                    front,
                    (x, s * (half - 0.2), z_lamp),
                    0.14,
                    lamp_h / 2,
                    (0, 1, 0),
                    HEADLIGHT_RGB,
                    LAMP,
                    piece,
                )
            if grille:
                b.rect_decal(
                    front,
                    (x, 0.0, z_lamp - lamp_h * 0.1),
                    half - 0.45,
                    lamp_h * 0.55,
                    (0, 1, 0),
                    GRILLE_RGB,
                    MATTE,
                    piece,
                )
        rear = piece.face_towards((-1, 0, 0))
        if rear.normal[0] < -0.95:
            x = rear.points[:, 0].min()
            for s in (1, -1):
                b.rect_decal(
                    rear,
                    (x, s * (half - 0.16), z_lamp),
                    0.11,
                    lamp_h / 2,
                    (0, 1, 0),
                    TAILLIGHT_RGB,
                    LAMP,
                    piece,
                )


def _roof_line(xcr: float, xcf: float, ws: float, rw: float, min_roof: float = 0.25) -> tuple[float, float]:
    """Top front and top rear x of a cabin, shrinking the windshield/rear-window runs to keep a roof."""
    spare = (xcf - xcr) - min_roof
    if ws + rw > spare:
        k = spare / (ws + rw)
        ws, rw = ws * k, rw * k
    return xcf - ws, xcr + rw


def _cabin(
    b: CarBuilder,
    profile,
    half_bottom: float,
    half_top: float,
    colour,
    pillar: float,
    splits: Sequence[float] = (),
    windows: Sequence[bool] | None = None,
    rear_window: bool = True,
    windshield: bool = True,
) -> Solid:
    """The greenhouse: a tapered prism with a windshield, a rear window and side windows between pillars.

    ``splits`` are x positions of the pillars between side windows; ``windows`` says which of the resulting
    side openings are glazed (vans have blind panels).
    """
    cabin = b.prism(profile, half_bottom, half_top, colour=colour)
    if windshield:
        b.inset_decal(cabin.face_towards((1, 0, 0.3)), pillar, GLASS_RGB, GLASS)
    if rear_window:
        b.inset_decal(cabin.face_towards((-1, 0, 0.3)), pillar, GLASS_RGB, GLASS)
    edges = [-np.inf, *sorted(splits), np.inf]
    windows = [True] * (len(edges) - 1) if windows is None else windows
    for side in (1.0, -1.0):
        face = cabin.face_towards((0, side, 0))
        for k in range(len(edges) - 1):
            if not windows[k]:
                continue
            cuts = []
            if np.isfinite(edges[k]):
                cuts.append(((-1.0, 0, 0), -(edges[k] + pillar / 2)))
            if np.isfinite(edges[k + 1]):
                cuts.append(((1.0, 0, 0), edges[k + 1] - pillar / 2))
            b.inset_decal(face, pillar, GLASS_RGB, GLASS, cuts)
    return cabin


def _top_stripe(
    b: CarBuilder, piece: Solid, x0: float, x1: float, half_width: float, colour, min_nz: float = 0.5
) -> None:
    """A stripe |y| <= half_width, x0 <= x <= x1 over the upward faces (normal z > min_nz) of ``piece``."""
    for face in piece.faces:
        n = face.normal
        if n[2] <= min_nz:
            continue
        d = float(n @ face.points[0])
        corners = np.array([[x0, -half_width], [x1, -half_width], [x1, half_width], [x0, half_width]])
        z = (d - corners @ n[:2]) / n[2]
        b.clipped_decal(np.column_stack([corners, z]), piece, face, colour, BODY)


def _wheel_xs(L: float, front: float, rear: float) -> tuple[float, float]:
    return L / 2 - front, -L / 2 + rear


# ---------------------------------------------------------------------------------------------------------
# Body types (dimensions in metres; U = rng.uniform)


def _sedan(b: CarBuilder, rng: np.random.Generator, paint: Paint) -> tuple:
    """A passenger car: three-box sedan, hatchback, estate (wagon) or coupe."""
    U = rng.uniform
    style = ("sedan", "hatchback", "wagon", "coupe")[int(rng.choice(4, p=[0.45, 0.25, 0.15, 0.15]))]
    L = {"sedan": U(4.4, 4.9), "hatchback": U(3.8, 4.3), "wagon": U(4.5, 4.9), "coupe": U(4.3, 4.7)}[style]
    W = U(1.72, 1.88)
    c, hb = U(0.15, 0.2), U(0.64, 0.74)
    hc = U(0.4, 0.46) if style == "coupe" else U(0.44, 0.54)
    r, tw = U(0.30, 0.34), U(0.19, 0.23)
    half, z0 = W / 2, c
    z1, zt = c + hb, c + hb + hc
    xf, xr = L / 2, -L / 2
    ws = U(0.8, 1.0) if style == "coupe" else U(0.6, 0.85)
    if style in ("sedan", "coupe"):
        lc = (U(0.36, 0.42) if style == "coupe" else U(0.44, 0.52)) * L
        xcc = U(-0.08, -0.01) * L
        xcf, xcr = xcc + lc / 2, xcc - lc / 2
        rw = U(0.7, 0.95) if style == "coupe" else U(0.45, 0.7)
    else:  # the cabin runs to the tail
        xcf = xf - U(0.3, 0.36) * L
        xcr = xr + (U(0.1, 0.18) if style == "hatchback" else U(0.06, 0.12))
        rw = U(0.25, 0.45) if style == "hatchback" else U(0.1, 0.22)
    prof = [
        (xr + 0.12, z0),
        (xf - 0.14, z0),
        (xf, z0 + 0.2 * hb),
        (xf, z0 + 0.6 * hb),
        (xf - 0.16, z1 - U(0.07, 0.13)),
        (xcf + 0.05, z1),
        (max(xcr - 0.05, xr + 0.12), z1),
        (xr + 0.12, z1 - U(0.03, 0.08)),
        (xr, z1 - 0.18 * hb),
        (xr, z0 + 0.25 * hb),
    ]
    body = _lower_body(b, prof, half, z0 + U(*WAIST) * hb, paint.body, paint.accent, paint.body)
    top_f, top_r = _roof_line(xcr, xcf, ws, rw)
    cab = [(xcr, z1), (xcf, z1), (top_f, zt), (top_r, zt)]
    splits = {
        "sedan": [(top_f + top_r) / 2 + U(-0.08, 0.08)],
        "coupe": [],
        "hatchback": [top_f - (top_f - top_r) * U(0.4, 0.5)],
        "wagon": list(top_f - (top_f - top_r) * np.array([U(0.33, 0.38), U(0.66, 0.72)])),
    }[style]
    _cabin(b, cab, half - 0.05, half - 0.05 - U(0.12, 0.18), paint.accent, 0.07, splits=splits)
    _wheels(b, _wheel_xs(L, U(0.15, 0.2) * L, U(0.15, 0.2) * L), r, tw, half, body, rng)
    _front_and_rear(b, body, half, z0 + 0.45 * hb, 0.13)
    return L, half


def _jeep(b: CarBuilder, rng: np.random.Generator, paint: Paint) -> tuple:
    U = rng.uniform
    L, W = U(4.0, 4.7), U(1.82, 1.98)
    c, hb, hc = U(0.3, 0.38), U(0.66, 0.78), U(0.58, 0.7)
    r, tw = U(0.38, 0.44), U(0.25, 0.3)
    half, z0 = W / 2, c
    z1, zt = c + hb, c + hb + hc
    xf, xr = L / 2, -L / 2
    xcf = xf - U(0.26, 0.32) * L
    ws = U(0.22, 0.38)
    prof = [
        (xr + 0.06, z0),
        (xf - 0.1, z0),
        (xf, z0 + 0.2 * hb),
        (xf, z0 + 0.82 * hb),
        (xf - 0.07, z1 - U(0.02, 0.05)),
        (xcf + 0.05, z1),
        (xr, z1),
        (xr, z0 + 0.15 * hb),
    ]
    body = _lower_body(b, prof, half, z0 + U(*WAIST) * hb, paint.body, paint.accent, paint.body)
    top_r = xr + U(0.06, 0.16)
    cab = [(xr + 0.03, z1), (xcf, z1), (xcf - ws, zt), (top_r, zt)]
    x_top = np.linspace(xcf - ws, top_r, 4)
    cabin = _cabin(
        b,
        cab,
        half - 0.04,
        half - 0.04 - U(0.05, 0.1),
        paint.body,
        0.08,
        splits=[x_top[1] + U(-0.05, 0.05), x_top[2] + U(-0.05, 0.05)],
    )
    stripe = U(0.22, 0.32)
    if paint.two_tone:  # a stripe over hood and roof
        _top_stripe(b, body[1], xcf, xf + 1.0, stripe, paint.accent)
        _top_stripe(b, cabin, xr - 1.0, xf + 1.0, stripe, paint.accent, min_nz=0.9)
    if rng.uniform() < 0.4:  # roof rails
        for s in (1, -1):
            b.box(
                top_r + 0.2,
                xcf - ws - 0.15,
                s * (half - 0.28) - 0.03,
                s * (half - 0.28) + 0.03,
                zt,
                zt + 0.07,
                (0.15, 0.15, 0.16),
                MATTE,
            )
    _wheels(b, _wheel_xs(L, U(0.16, 0.2) * L, U(0.15, 0.19) * L), r, tw, half, body, rng)
    _front_and_rear(b, body, half, z0 + 0.6 * hb, 0.15)
    if rng.uniform() < 0.5:  # spare wheel on the tailgate
        b.cylinder((xr - 0.1, 0.0, z0 + 0.55 * hb), (1, 0, 0), r * 0.92, 0.2, 16, TYRE_RGB, TYRE)
    return L, half


def _van(b: CarBuilder, rng: np.random.Generator, paint: Paint) -> tuple:
    U = rng.uniform
    L, W = U(4.8, 5.5), U(1.9, 2.05)
    c, hb, hc = U(0.15, 0.21), U(0.68, 0.8), U(1.05, 1.25)
    r, tw = U(0.31, 0.35), U(0.21, 0.25)
    half, z0 = W / 2, c
    z1, zt = c + hb, c + hb + hc
    xf, xr = L / 2, -L / 2
    xcf = xf - U(0.09, 0.14) * L
    ws = U(0.45, 0.65)
    prof = [
        (xr + 0.05, z0),
        (xf - 0.1, z0),
        (xf, z0 + 0.22 * hb),
        (xf, z0 + 0.68 * hb),
        (xf - 0.12, z1 - U(0.04, 0.1)),
        (xcf + 0.05, z1),
        (xr, z1),
        (xr, z0 + 0.12 * hb),
    ]
    body = _lower_body(b, prof, half, z0 + U(*WAIST) * hb, paint.body, paint.accent, paint.body)
    top_r = xr + U(0.02, 0.07)
    cab = [(xr + 0.02, z1), (xcf, z1), (xcf - ws, zt), (top_r, zt)]
    door = xcf - ws - U(0.75, 0.95)
    n_rear = int(rng.integers(2, 4))
    rear_edges = list(np.linspace(door, top_r, n_rear + 1)[1:-1])
    glazed = rng.uniform() < 0.5  # passenger van (windows all along) or panel van (blind sides)
    cabin = _cabin(
        b,
        cab,
        half - 0.03,
        half - 0.03 - U(0.03, 0.07),
        paint.body,
        0.09,
        splits=[door, *rear_edges],
        windows=[True] + [glazed] * (n_rear),
        rear_window=rng.uniform() < 0.6,
    )
    stripe = U(0.25, 0.35)
    if paint.two_tone:  # a stripe over hood and roof
        _top_stripe(b, body[1], xcf, xf + 1.0, stripe, paint.accent)
        _top_stripe(b, cabin, xr - 1.0, xf + 1.0, stripe, paint.accent, min_nz=0.9)
    _wheels(b, _wheel_xs(L, U(0.13, 0.17) * L, U(0.14, 0.19) * L), r, tw, half, body, rng)
    _front_and_rear(b, body, half, z0 + 0.5 * hb, 0.14)
    return L, half


def _truck(b: CarBuilder, rng: np.random.Generator, paint: Paint) -> tuple:
    U = rng.uniform
    L, W = U(5.0, 5.6), U(1.88, 2.0)
    c, hb, hc = U(0.3, 0.36), U(0.7, 0.82), U(0.6, 0.68)
    r, tw = U(0.37, 0.42), U(0.25, 0.29)
    half, z0 = W / 2, c
    z1, zt = c + hb, c + hb + hc
    xf, xr = L / 2, -L / 2
    xcf = xf - U(0.24, 0.3) * L
    xcr = xcf - U(0.2, 0.28) * L
    ws = U(0.28, 0.42)
    prof = [
        (xr + 0.05, z0),
        (xf - 0.1, z0),
        (xf, z0 + 0.22 * hb),
        (xf, z0 + 0.8 * hb),
        (xf - 0.1, z1 - U(0.03, 0.07)),
        (xcf + 0.05, z1),
        (xr, z1),
        (xr, z0 + 0.15 * hb),
    ]
    body = _lower_body(b, prof, half, z0 + U(*WAIST) * hb, paint.body, paint.accent, paint.body)
    cab = [(xcr, z1), (xcf, z1), (xcf - ws, zt), (xcr + 0.05, zt)]
    crew = xcf - xcr > 0.24 * L
    cabin = _cabin(
        b,
        cab,
        half - 0.04,
        half - 0.04 - U(0.05, 0.1),
        paint.body,
        0.08,
        splits=[(xcf - ws + xcr) / 2] if crew else (),
    )
    stripe = U(0.22, 0.32)
    if paint.two_tone:  # a stripe over hood and cab roof (and the box, below)
        _top_stripe(b, body[1], xcf, xf + 1.0, stripe, paint.accent)
        _top_stripe(b, cabin, xr - 1.0, xf + 1.0, stripe, paint.accent, min_nz=0.9)
    bed_front = xcr - U(0.05, 0.1)
    if rng.uniform() < 0.65:  # pickup: open bed with walls, a dark liner
        bh, t = U(0.38, 0.52), 0.06
        for s in (1, -1):
            b.box(
                xr,
                bed_front,
                s * half - t if s > 0 else -half,
                half if s > 0 else -half + t,
                z1 - 0.02,
                z1 + bh,
                paint.body,
            )
        b.box(xr, xr + t, -half + t, half - t, z1 - 0.02, z1 + bh * 0.92, paint.body)
        b.box(bed_front - t, bed_front, -half + t, half - t, z1 - 0.02, z1 + bh, paint.body)
        top = body[1].face_towards((0, 0, 1))
        b.rect_decal(
            top,
            ((xr + bed_front) / 2, 0.0, z1),
            (bed_front - xr) / 2 - t,
            half - t,
            (1, 0, 0),
            BED_RGB,
            MATTE,
        )
    else:  # box truck
        bz = zt + U(0.15, 0.45)
        box = b.box(xr, bed_front, -half - 0.05, half + 0.05, z1 - 0.05, bz, paint.body)
        if paint.two_tone:
            _top_stripe(b, box, xr - 1.0, xf + 1.0, stripe, paint.accent, min_nz=0.9)
    _wheels(b, _wheel_xs(L, U(0.15, 0.18) * L, U(0.15, 0.2) * L), r, tw, half, body, rng)
    _front_and_rear(b, body, half, z0 + 0.62 * hb, 0.16)
    return L, half


def _sports(b: CarBuilder, rng: np.random.Generator, paint: Paint) -> tuple:
    U = rng.uniform
    L, W = U(4.25, 4.65), U(1.92, 2.06)
    c, hb, hc = U(0.08, 0.11), U(0.56, 0.64), U(0.3, 0.37)
    r, tw = U(0.29, 0.32), U(0.25, 0.3)
    half, z0 = W / 2, c
    z1, zt = c + hb, c + hb + hc
    xf, xr = L / 2, -L / 2
    lc = U(0.38, 0.44) * L
    xcc = U(-0.13, -0.06) * L
    xcf, xcr = xcc + lc / 2, xcc - lc / 2
    ws, rw = U(0.8, 1.0), U(0.55, 0.8)
    prof = [
        (xr + 0.1, z0),
        (xf - 0.25, z0),
        (xf, z0 + 0.12 * hb),
        (xf, z0 + 0.3 * hb),
        (xf - 0.12, z0 + U(0.48, 0.56) * hb),
        (xcf + 0.05, z1),
        (xcr - 0.05, z1),
        (xr + 0.1, z1 - U(0.02, 0.06)),
        (xr, z1 - 0.15 * hb),
        (xr, z0 + 0.28 * hb),
    ]
    body = _lower_body(b, prof, half, z0 + U(*WAIST) * hb, paint.body, paint.accent, paint.body)
    top_f, top_r = _roof_line(xcr, xcf, ws, rw)
    cab = [(xcr, z1), (xcf, z1), (top_f, zt), (top_r, zt)]
    _cabin(b, cab, half - 0.1, half - 0.1 - U(0.15, 0.22), paint.accent, 0.06)
    if rng.uniform() < 0.45:  # rear wing on two posts
        wz = z1 + U(0.12, 0.2)
        b.box(xr + 0.04, xr + 0.34, -half + 0.12, half - 0.12, wz, wz + 0.04, paint.accent)
        for s in (1, -1):
            b.box(
                xr + 0.16,
                xr + 0.22,
                s * (half - 0.45) - 0.02,
                s * (half - 0.45) + 0.02,
                z1 - 0.05,
                wz,
                paint.accent,
            )
    _wheels(b, _wheel_xs(L, U(0.16, 0.19) * L, U(0.15, 0.18) * L), r, tw, half, body, rng)
    _front_and_rear(b, body, half, z0 + 0.22 * hb, 0.08, grille=False)
    return L, half


def _open(b: CarBuilder, rng: np.random.Generator, paint: Paint) -> tuple:
    U = rng.uniform
    L, W = U(4.0, 4.5), U(1.74, 1.9)
    c, hb = U(0.12, 0.16), U(0.6, 0.7)
    r, tw = U(0.30, 0.33), U(0.2, 0.24)
    half, z0 = W / 2, c
    z1 = c + hb
    xf, xr = L / 2, -L / 2
    x_ws = U(0.04, 0.12) * L
    x_cp = x_ws - U(0.3, 0.42) * L  # rear end of the cockpit
    prof = [
        (xr + 0.1, z0),
        (xf - 0.15, z0),
        (xf, z0 + 0.2 * hb),
        (xf, z0 + 0.55 * hb),
        (xf - 0.18, z1 - U(0.06, 0.12)),
        (x_ws + 0.1, z1),
        (x_cp - 0.15, z1),
        (xr + 0.18, z1 - U(0.03, 0.07)),
        (xr, z1 - 0.18 * hb),
        (xr, z0 + 0.25 * hb),
    ]
    body = _lower_body(b, prof, half, z0 + U(*OPEN_WAIST) * hb, paint.body, paint.accent, paint.body)
    # windshield: a thin raked slab in the upper paint with glass on both faces
    wh, rake = U(0.26, 0.34), U(0.2, 0.3)
    slab = [
        (x_ws, z1 - 0.02),
        (x_ws + 0.05, z1 - 0.02),
        (x_ws + 0.05 - rake, z1 + wh),
        (x_ws - rake, z1 + wh),
    ]
    shield = b.prism(slab, half - 0.1, half - 0.14, colour=paint.accent)
    b.inset_decal(shield.face_towards((1, 0, 0.4)), 0.05, GLASS_RGB, GLASS)
    b.inset_decal(shield.face_towards((-1, 0, -0.4)), 0.05, GLASS_RGB, GLASS)
    # a racing stripe down the middle of hood and rear deck, in the second colour
    stripe = U(0.22, 0.32)
    if paint.two_tone:
        for x0, x1 in ((x_ws + 0.06, xf + 1.0), (xr - 1.0, x_cp - 0.04)):
            _top_stripe(b, body[1], x0, x1, stripe, paint.accent)
    # cockpit opening and seats
    interior = INTERIOR_RGBS[int(rng.integers(len(INTERIOR_RGBS)))]
    top = body[1].face_towards((0, 0, 1))
    b.rect_decal(
        top,
        ((x_ws - 0.04 + x_cp) / 2, 0.0, z1),
        (x_ws - 0.04 - x_cp) / 2,
        half - 0.14,
        (1, 0, 0),
        tuple(0.6 * np.asarray(interior)),
        MATTE,
    )
    rows = [x_ws - U(0.6, 0.75)]
    if x_ws - x_cp > 1.5:
        rows.append(rows[0] - U(0.75, 0.9))
    seat_h, lean = U(0.32, 0.42), U(0.08, 0.15)
    for xs in rows:
        for s in (1, -1):
            yc = s * U(0.33, 0.4) * (W / 1.8)
            b.box(xs - 0.05, xs + 0.42, yc - 0.24, yc + 0.24, z1 - 0.2, z1 + 0.06, interior, MATTE)
            back = [
                (xs - 0.1, z1 - 0.2),
                (xs + 0.02, z1 - 0.2),
                (xs + 0.02 - lean, z1 + seat_h),
                (xs - 0.1 - lean, z1 + seat_h),
            ]
            b.prism(back, 0.23, 0.2, colour=interior, material=MATTE, y_centre=yc)
    _wheels(b, _wheel_xs(L, U(0.15, 0.19) * L, U(0.15, 0.19) * L), r, tw, half, body, rng)
    _front_and_rear(b, body, half, z0 + 0.42 * hb, 0.11)
    return L, half


_BUILDERS = {
    "car": _sedan,
    "jeep/bus": _jeep,
    "van": _van,
    "truck": _truck,
    "sports car": _sports,
    "open car": _open,
}
assert set(_BUILDERS) == set(BODY_TYPES)


def build_car(body_type: str, colours: Sequence[str], rng: np.random.Generator) -> Mesh:
    """A normalised car mesh of ``body_type`` painted in one or two colour names (see the module docstring)."""
    if body_type not in _BUILDERS:
        raise ClipdiffError(f"unknown body type {body_type!r} (known: {', '.join(BODY_TYPES)})")
    if not 1 <= len(colours) <= 2:
        raise ClipdiffError(f"a car has one or two colours, got {list(colours)}")
    first = sample_paint(colours[0], rng)
    second = sample_paint(colours[1], rng) if len(colours) == 2 else first
    paint = Paint(first, second)
    b = CarBuilder()
    length, half = _BUILDERS[body_type](b, rng, paint)
    return b.finish((-length / 2, length / 2, -half, half))
