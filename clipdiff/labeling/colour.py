"""Car/background segmentation and paint colour naming from several views (numpy only, vectorised).

* :func:`car_mask`: the car's pixels on a white background with a soft grey ground shadow — background is the
  light, neutral region connected to the image border; flat light faces (white paint) are kept, the blurred
  shadow gradient is not.
* :func:`classify_pixels`: tinted glass, dark (tyres, wells, grilles, black paint), achromatic paint (white,
  grey), the four paint hues, other. Hub caps inside tyres and the silhouette's anti-aliased rim are left out
  of the paint statistics.
* :class:`ColourEvidence`: counts over the views of one object, overall and in a lower and an upper band of
  every image column (cameras are upright: the lower body is at the bottom of each column), brightness
  histograms of achromatic paint, and dark pixels under the lowest paint (a black lower body).
* :func:`colour_costs`: a cost for every colouring (one colour, or a dominant colour with accents of a
  second), used by :mod:`clipdiff.labeling.labeller` together with the body-type likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) RGB → hue, saturation, value as float32 arrays in [0, 1]."""
    x = rgb.astype(np.float32) * np.float32(1 / 255)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    c = v - mn
    s = np.where(v > 0, c / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(c, 1e-6)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return h.astype(np.float32), s.astype(np.float32), v.astype(np.float32)


def _run_ids(cand: np.ndarray) -> np.ndarray:
    """Id (1, 2, …) of the horizontal run of ``cand`` each pixel belongs to; 0 outside ``cand``."""
    c = cand.ravel()
    start = c.copy()
    start[1:] &= ~c[:-1]
    start[:: cand.shape[1]] = c[:: cand.shape[1]]
    return (np.cumsum(start, dtype=np.int32) * c).reshape(cand.shape)


def border_connected(cand: np.ndarray) -> np.ndarray:
    """The pixels of ``cand`` connected (4-neighbourhood) to the image border.

    Connected components over horizontal runs: runs are nodes, vertically touching runs are edges; labels
    are propagated along the edges (with pointer jumping) until they settle.
    """
    rows = _run_ids(cand)
    n = int(rows.max())
    if n == 0:
        return np.zeros_like(cand)
    both = cand[:-1] & cand[1:]
    a, b = rows[:-1][both], rows[1:][both]
    key = np.unique(a.astype(np.int64) * (n + 1) + b)
    a, b = key // (n + 1), key % (n + 1)
    label = np.arange(n + 1)
    for _ in range(4 * n + 4):
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    border = np.concatenate([rows[0], rows[-1], rows[:, 0], rows[:, -1]])
    hit = np.zeros(n + 1, dtype=bool)
    hit[label[border[border > 0]]] = True
    hit[0] = False
    return hit[label][rows]


def _max3(a: np.ndarray) -> np.ndarray:
    """Maximum over each pixel's 3×3 neighbourhood (the image edge adds nothing), separably."""
    r = a.copy()
    np.maximum(r[:, 1:], a[:, :-1], out=r[:, 1:])
    np.maximum(r[:, :-1], a[:, 1:], out=r[:, :-1])
    out = r.copy()
    np.maximum(out[1:], r[:-1], out=out[1:])
    np.maximum(out[:-1], r[1:], out=out[:-1])
    return out


def _local_range(a: np.ndarray) -> np.ndarray:
    """max − min over each pixel's 3×3 neighbourhood (edges replicated)."""
    return _max3(a) - (-_max3(-a))


def car_mask(rgb: np.ndarray, light: int = 220, neutral: int = 12, flat_below: int = 250) -> np.ndarray:
    """Car pixels of a view on a white background (with a soft grey ground shadow).

    Background is what is connected to the image border through light, neutral pixels. A flat-shaded white
    or light-grey face is as light as the shadow, but it is uniform, whereas the blurred shadow is a gradient:
    light pixels in a perfectly flat neighbourhood darker than ``flat_below`` are kept as car.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mn = np.minimum(np.minimum(r, g), b)
    mx = np.maximum(np.maximum(r, g), b)
    cand = (mn >= light) & ((mx - mn) <= neutral)
    flat = _local_range(mn.astype(np.int16)) <= 1
    cand &= ~(flat & (mn < flat_below))
    return close(~border_connected(cand))


def _dilate(m: np.ndarray) -> np.ndarray:
    return _max3(m.view(np.uint8)).view(bool)


def close(mask: np.ndarray) -> np.ndarray:
    """3×3 morphological closing: seals one-pixel cracks (a crease between two light faces) in a mask."""
    d = _dilate(mask)
    d[0, :], d[-1, :], d[:, 0], d[:, -1] = mask[0, :], mask[-1, :], mask[:, 0], mask[:, -1]
    return ~_dilate(~d)


# Pixel classes of a car view (see classify_pixels)
BG, GLASS, DARK, ACHRO, RED, YELLOW, GREEN, BLUE, OTHER = range(9)
CHROMATIC = {RED: "red", YELLOW: "yellow", GREEN: "green", BLUE: "blue"}


def classify_pixels(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-pixel class (uint8): background, tinted glass, dark (tyres, wells, black paint…), achromatic
    (white/grey paint, hubs, lamps), the four paint hues, or other (edges, interiors)."""
    out = np.full(mask.shape, BG, dtype=np.uint8)
    out[mask] = classify_colours(rgb[mask])
    return out


def classify_colours(rgb: np.ndarray) -> np.ndarray:
    """Class of each colour of an (N, 3) uint8 array (see :func:`classify_pixels`)."""
    h, s, v = rgb_to_hsv(rgb)
    out = np.full(len(rgb), OTHER, dtype=np.uint8)
    chroma = (s >= 0.4) & (v >= 0.22)
    out[chroma & ((h < 0.05) | (h >= 0.93))] = RED
    out[chroma & (h >= 0.09) & (h < 0.21)] = YELLOW
    out[chroma & (h >= 0.22) & (h < 0.46)] = GREEN
    out[chroma & (h >= 0.52) & (h < 0.72)] = BLUE
    glass = (h >= 0.52) & (h < 0.70) & (s >= 0.1) & (s < 0.5) & (v >= 0.06) & (v < 0.6)
    out[glass] = GLASS
    out[~glass & ~chroma & (v < 0.22)] = DARK
    out[(s < 0.12) & (v >= 0.22)] = ACHRO
    return out


TYRE_LIKE = (BG, GLASS, DARK, OTHER)  # not paint: what may sit below the body between the wheels
PAINT_CLASSES = (ACHRO, RED, YELLOW, GREEN, BLUE)
VBINS = 40  # value histogram bins of achromatic paint


def _near(mask: np.ndarray, r: int, axis: int, forward: bool) -> np.ndarray:
    """Whether ``mask`` holds a pixel within ``r`` pixels before (``forward``) or after each pixel along ``axis``."""
    m = mask if axis == 0 else mask.T
    if not forward:
        m = m[::-1]
    cs = np.zeros((m.shape[0] + 1, m.shape[1]), dtype=np.int32)
    np.cumsum(m, axis=0, out=cs[1:])
    n = m.shape[0]
    idx = np.arange(n)
    out = (cs[idx] - cs[np.maximum(idx - r, 0)]) > 0  # pixels idx-r … idx-1
    if not forward:
        out = out[::-1]
    return out if axis == 0 else out.T


def mask_hubs(classes: np.ndarray, r: int | None = None) -> np.ndarray:
    """Relabel light pixels enclosed by dark ones on all four sides (hub caps inside tyres) as OTHER."""
    r = r or max(3, round(classes.shape[0] * 0.05))
    dark = classes == DARK
    cand = classes == ACHRO
    enclosed = cand.copy()
    for axis in (0, 1):
        for forward in (True, False):
            enclosed &= _near(dark, r, axis, forward)
    if not enclosed.any():
        return classes
    out = classes.copy()
    out[enclosed] = OTHER
    return out


@dataclass
class ColourEvidence:
    """Pixel counts accumulated over the views of one object.

    ``lower``/``upper``: paint class counts among the lowest / highest paint pixels of each image column
    (cameras are upright, so the lower body is at the bottom of every column it appears in); ``*_v``: value
    histograms of achromatic paint in each band; ``pixels``: class counts over the whole car.
    """

    pixels: np.ndarray = field(default_factory=lambda: np.zeros(9))
    lower: np.ndarray = field(default_factory=lambda: np.zeros(9))
    upper: np.ndarray = field(default_factory=lambda: np.zeros(9))
    lower_v: np.ndarray = field(default_factory=lambda: np.zeros(VBINS))
    upper_v: np.ndarray = field(default_factory=lambda: np.zeros(VBINS))
    all_v: np.ndarray = field(default_factory=lambda: np.zeros(VBINS))
    dark_below: float = 0.0  # Σ over columns of dark / (dark + paint) below the lowest paint pixel
    columns: int = 0
    views: int = 0

    def add(self, rgb: np.ndarray, classes: np.ndarray, low: float = 0.25, high: float = 0.6) -> None:
        classes = mask_hubs(classes)
        inner = ~_dilate(classes == BG)  # the silhouette's rim blends paint with the background
        classes = np.where(inner, classes, BG).astype(np.uint8)
        paint = np.isin(classes, PAINT_CLASSES)
        total = paint.sum(0)
        below = np.cumsum(paint[::-1], axis=0)[::-1]  # paint pixels at or below each row, per column
        rank = (below - 1) / np.maximum(total - 1, 1)
        ok = paint & (total >= 4)[None, :]
        lower, upper = ok & (rank <= low), ok & (rank >= high)
        v = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) * (VBINS / 256.0)
        achro = classes == ACHRO
        self.pixels += np.bincount(classes.ravel(), minlength=9)[:9]
        self.lower += np.bincount(classes[lower], minlength=9)[:9]
        self.upper += np.bincount(classes[upper], minlength=9)[:9]
        for band, hist in ((lower, self.lower_v), (upper, self.upper_v), (achro, self.all_v)):
            hist += np.bincount(v[band & achro].astype(np.int64), minlength=VBINS)[:VBINS]
        # black paint: a black lower body shows as dark pixels below the lowest paint of every column (not
        # only of the wheel columns)
        dark = classes == DARK
        cols = total >= 4
        if cols.any():
            h = classes.shape[0]
            lowest = h - 1 - np.argmax(paint[::-1], axis=0)
            below = np.cumsum(dark[::-1], axis=0, dtype=np.int32)[::-1]  # dark at or below each row
            idx = np.arange(classes.shape[1])
            d_below = np.where(lowest + 1 < h, below[np.minimum(lowest + 1, h - 1), idx], 0)
            self.dark_below += float((d_below / (d_below + total + 1e-9))[cols].sum())
            self.columns += int(cols.sum())
        self.views += 1


def _quantile(hist: np.ndarray, q: float) -> float:
    """Quantile (0–1 value scale) of a value histogram; NaN when empty."""
    c = np.cumsum(hist)
    if c[-1] <= 0:
        return float("nan")
    return (float(np.searchsorted(c, q * c[-1])) + 0.5) / VBINS


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 below ``lo``, 1 above ``hi``, linear between (NaN counts as 0)."""
    if not np.isfinite(x):
        return 0.0
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


@dataclass
class ColourRules:
    """Thresholds and weights of :func:`colour_costs` (set on renders with seeds 101–104)."""

    two_tone: float = 0.12  # a second colour must cover more than this share of the paint to be named
    accent_missing: float = 4.0  # × how far the second colour's share falls short of ``two_tone``
    order: float = 1.0  # × how much more the second colour fills the lower band than the first one
    achro_split: tuple[float, float] = (0.53, 0.6)  # median value of achromatic paint: grey below, white above
    white_grey_lower: float = 0.55  # white and grey: median value of the lower band at least this …
    white_grey_upper: tuple[float, float] = (0.55, 0.6)  # … and the upper band's darkest quarter below these
    achro_two_tone: float = 0.15  # extra cost of naming two achromatic colours (shading also makes greys)
    paintless: tuple[float, float] = (0.06, 0.1)  # paint share of the car: black car below / not above
    black_body: tuple[float, float] = (0.16, 0.24)  # dark share under the lowest paint: black first colour
    black_paint: tuple[float, float] = (0.6, 0.52)  # … which also needs the paint share below these
    # Black accents: the car's dark share (glass excluded) above what tyres, wells, grilles, interiors and
    # load beds give each body type without black paint, by this much (0 → not black, 1 → black).
    dark_normal: dict = field(default_factory=lambda: {
        "car": 0.12, "jeep/bus": 0.2, "van": 0.1, "truck": 0.36, "sports car": 0.14, "open car": 0.35})
    dark_excess: float = 0.08
    grey_white: tuple[float, float] = (0.62, 0.7)  # grey and white: the upper band's brightest quarter above


def colour_costs(ev: ColourEvidence, body_type: str = "car", rules: ColourRules | None = None
                 ) -> dict[tuple[str, ...], float]:
    """Cost (≥ 0, lower is better) of every colouring — one colour or (first, second) — given the evidence.

    A two-tone car is painted in a dominant first colour with accents of the second (the procedural set's
    convention, and what the original labels describe): the first colour fills the lower band of every
    column, the second shows as a sizeable share of the paint, mostly high up. Costs: the share of paint a
    colouring leaves unexplained, a fixed price for naming a second colour, and penalties for the wrong order
    or missing black evidence. White and grey are one achromatic family told apart by brightness.
    """
    from clipdiff.data.vocab import COLOURS

    r = rules or ColourRules()
    fam = (ACHRO, RED, YELLOW, GREEN, BLUE)
    body = ev.pixels.copy()
    body[BG] = body[GLASS] = 0
    body_n = max(body.sum(), 1.0)
    paint_n = sum(body[c] for c in fam)
    paint = paint_n / body_n

    def shares(counts: np.ndarray) -> dict[int, float]:
        n = sum(counts[c] for c in fam)
        return {c: (counts[c] / n if n > 0 else 0.0) for c in fam}

    s_all, s_lo = shares(ev.pixels), shares(ev.lower)
    cols = max(ev.columns, 1)
    black_all = _ramp(-paint, -r.paintless[1], -r.paintless[0])
    black_first = max(black_all, _ramp(ev.dark_below / cols, *r.black_body)
                      * _ramp(-paint, -r.black_paint[0], -r.black_paint[1]))
    normal = r.dark_normal.get(body_type, max(r.dark_normal.values()))
    black_second = _ramp(body[DARK] / body_n - normal, 0.0, r.dark_excess)
    # achromatic paint: white or grey by brightness (its median over the car)
    p50 = _quantile(ev.all_v, 0.5)
    white = _ramp(p50, *r.achro_split) if np.isfinite(p50) else 1.0
    lo50, up25, up75 = _quantile(ev.lower_v, 0.5), _quantile(ev.upper_v, 0.25), _quantile(ev.upper_v, 0.75)
    white_grey = (_ramp(lo50, r.white_grey_lower - 0.03, r.white_grey_lower + 0.03)
                  * _ramp(-up25, -r.white_grey_upper[1], -r.white_grey_upper[0])) if np.isfinite(up25) else 0.0
    grey_white = (_ramp(-lo50, -r.achro_split[1], -r.achro_split[0]) * _ramp(up75, *r.grey_white)
                  if np.isfinite(up75) else 0.0)
    cls = {name: c for c, name in CHROMATIC.items()}
    cls["white"] = cls["gray"] = ACHRO

    def name_cost(name: str) -> float:
        return (1.0 - white) if name == "white" else white if name == "gray" else 0.0

    def accent(c: int) -> float:  # the second colour must be there
        return r.two_tone + r.accent_missing * max(0.0, r.two_tone - s_all[c])

    out: dict[tuple[str, ...], float] = {}
    for x in COLOURS:
        if x == "black":
            out[(x,)] = 1.0 - black_all
            continue
        out[(x,)] = ((1.0 - s_all[cls[x]]) + name_cost(x) + max(black_first, black_second)
                     + (white_grey if x == "white" else grey_white if x == "gray" else 0.0))
    for x in COLOURS:
        for y in COLOURS:
            if x == y:
                continue
            if x == "black":
                out[(x, y)] = (1.0 - black_first) + (1.0 - s_all[cls[y]]) + name_cost(y) + r.two_tone
                continue
            if y == "black":
                out[(x, y)] = ((1.0 - black_second) + (1.0 - s_all[cls[x]]) + name_cost(x) + r.two_tone
                               + max(black_all, black_first))
                continue
            cx, cy = cls[x], cls[y]
            if cx == cy:  # white and grey: one achromatic family, split by brightness bands
                wg = white_grey if (x, y) == ("white", "gray") else grey_white
                out[(x, y)] = (1.0 - s_all[cx]) + r.achro_two_tone + (1.0 - wg) + max(black_first, black_second)
                continue
            out[(x, y)] = ((1.0 - s_all[cx] - s_all[cy]) + accent(cy) + name_cost(x) + name_cost(y)
                           + r.order * max(0.0, s_lo[cy] - s_lo[cx]) + max(black_first, black_second))
    return out
