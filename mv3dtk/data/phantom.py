"""Drawing of the synthetic chest-CT phantom used by :mod:`mv3dtk.data.synth`.

Everything here works on the stored voxel grid ``(W, H, D)`` = nibabel ``(i, j, k)`` and in
*normalised patient coordinates* on that grid (see :class:`Grid`):

* ``X`` in [-1, 1] along ``i``; ``X > 0`` is the patient's LEFT.
* ``Y`` in [-1, 1] along ``j``; ``Y > 0`` is POSTERIOR (the back, where the spine is).
* ``Z`` in [0, 1] along ``k``; ``Z = 0`` is the inferior end (upper abdomen), ``Z = 1`` the superior
  end (lower neck, lung apices just below it).

This matches the affine written by ``synth`` (``diag(-sx, -sy, sz)``, axcodes ``('L', 'P', 'S')``).
Anatomy scales with the field of view (the body fills it in-plane, the chest spans the slices);
lesions are sized in millimetres (``Grid.units`` converts) and clamped to fit the organ.

Two passes: :func:`draw_labels` paints a ``uint8`` tissue-label map (region masks are label sets,
:data:`REGION_LABELS`), then :func:`draw_hu` turns it into clean HU and draws the in-lung lesions;
:func:`render` adds a reconstruction's blur and noise.

This module is longer than the house limit of 600 lines on purpose: it is the phantom's anatomy, a
table of organ positions, sizes and HU values written as the small drawing functions that place them;
split across files, one organ's geometry would sit apart from the lesions drawn inside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------------------------------------
# Tissue labels and their HU
# ---------------------------------------------------------------------------------------------
(AIR, FAT, MUSCLE, MED_FAT, LUNG_R, LUNG_L, PLEURA_R, PLEURA_L, PFLUID_R, PFLUID_L, HEART,
 EPI_FAT, PERI_FLUID, AORTA, AORTA_ABD, ESOPH, HERNIA_WALL, HERNIA_GAS, TRACHEA_WALL, TRACHEA_AIR,
 VERT_CORTEX, VERT_MARROW, RIB, STERNUM, CANAL, DISC, THYROID, BREAST_FAT, BREAST_GLAND, LIVER,
 STOMACH, STOMACH_GAS, SPLEEN, ABD_OTHER, NODE) = range(35)

TISSUE_HU: dict[int, float] = {
    AIR: -1000, FAT: -100, MUSCLE: 45, MED_FAT: -90, LUNG_R: -850, LUNG_L: -850, PLEURA_R: -760,
    PLEURA_L: -760, PFLUID_R: 10, PFLUID_L: 10, HEART: 40, EPI_FAT: -95, PERI_FLUID: 5, AORTA: 45,
    AORTA_ABD: 45, ESOPH: 35, HERNIA_WALL: 30, HERNIA_GAS: -950, TRACHEA_WALL: 30,
    TRACHEA_AIR: -1000, VERT_CORTEX: 800, VERT_MARROW: 250, RIB: 650, STERNUM: 450, CANAL: 25,
    DISC: 80, THYROID: 90, BREAST_FAT: -105, BREAST_GLAND: 15, LIVER: 60, STOMACH: 30,
    STOMACH_GAS: -980, SPLEEN: 50, ABD_OTHER: -40, NODE: 45,
}
HU_LUT = np.zeros(256, np.float32)
for _label, _hu in TISSUE_HU.items():
    HU_LUT[_label] = _hu

# RadGenome's 10 top-level regions as label sets (regions may not overlap here).
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "abdomen": (AORTA_ABD, LIVER, STOMACH, STOMACH_GAS, SPLEEN, ABD_OTHER),
    "bone": (VERT_CORTEX, VERT_MARROW, RIB, STERNUM),
    "breast": (BREAST_FAT, BREAST_GLAND),
    "esophagus": (ESOPH, HERNIA_WALL, HERNIA_GAS),
    "heart": (HEART, EPI_FAT, PERI_FLUID),
    "lung": (LUNG_R, LUNG_L),
    "mediastinum": (MED_FAT, AORTA, NODE),
    "pleura": (PLEURA_R, PLEURA_L, PFLUID_R, PFLUID_L),
    "thyroid": (THYROID,),
    "trachea and bronchie": (TRACHEA_WALL, TRACHEA_AIR),
}
# A few RadGenome fine anatomies (mask stem -> labels).
FINE_LABELS: dict[str, tuple[int, ...]] = {
    "right lung": (LUNG_R,),
    "left lung": (LUNG_L,),
    "aorta": (AORTA, AORTA_ABD),
    "vertebrae": (VERT_CORTEX, VERT_MARROW),
    "liver": (LIVER,),
}

BONE = REGION_LABELS["bone"]
LUNG = (LUNG_R, LUNG_L)

# Lungs: footprint ellipse centre and semi-axes (X, Y), tapering above Z = 0.6 to the apex.
LUNG_GEOM = {"right": (LUNG_R, PLEURA_R, PFLUID_R, (-0.38, 0.04), (0.34, 0.50)),
             "left": (LUNG_L, PLEURA_L, PFLUID_L, (0.40, 0.05), (0.32, 0.48))}
HILUM = {"right": (-0.20, 0.03, 0.55), "left": (0.22, 0.05, 0.53)}
APEX_Z = 0.97
# Lobe sampling boxes in lung-local coordinates: (X_loc, Y_loc, Z_rel) ranges.
LOBE_BOX = {"upper": ((-0.5, 0.5), (-0.45, 0.35), (0.60, 0.82)),
            "middle": ((-0.4, 0.5), (-0.75, -0.30), (0.30, 0.50)),
            "lower": ((-0.5, 0.5), (0.10, 0.60), (0.12, 0.35))}


@dataclass(frozen=True)
class Grid:
    """Voxel grid (W, H, D) with normalised coordinates and mm per normalised unit."""

    shape: tuple[int, int, int]  # (W, H, D)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    x: np.ndarray  # (W,) patient-left
    y: np.ndarray  # (H,) posterior
    z: np.ndarray  # (D,) superior

    @property
    def units(self) -> np.ndarray:  # (3,) mm per unit of X, Y, Z
        w, h, d = self.shape
        sx, sy, sz = self.spacing
        return np.array([w * sx / 2, h * sy / 2, d * sz])


def make_grid(shape_whd: tuple[int, int, int], spacing_xyz: tuple[float, float, float]) -> Grid:
    w, h, d = shape_whd
    x = ((np.arange(w) + 0.5) / w * 2 - 1).astype(np.float32)
    y = ((np.arange(h) + 0.5) / h * 2 - 1).astype(np.float32)
    z = ((np.arange(d) + 0.5) / d).astype(np.float32)
    return Grid(tuple(shape_whd), tuple(float(s) for s in spacing_xyz), x, y, z)


@dataclass(frozen=True)
class Anatomy:
    """Per-patient anatomical variation."""

    sex: str  # "M" | "F"
    body_scale: float  # body and thoracic cavity size factor
    heart_scale: float
    heart_shift: float  # X shift of the heart
    dome_shift: float  # Z shift of the diaphragm


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(sex=str(rng.choice(["M", "F"])), body_scale=float(rng.uniform(0.96, 1.02)),
                   heart_scale=float(rng.uniform(0.95, 1.04)), heart_shift=float(rng.uniform(-0.02, 0.02)),
                   dome_shift=float(rng.uniform(-0.015, 0.015)))


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality: where it is and how big (filled in by the drawing)."""

    name: str
    side: str | None = None  # "right" | "left" | "both"
    lobe: str | None = None  # "upper" | "middle" | "lower"
    size_mm: float | None = None  # nodule diameter, effusion depth, node short axis, rim thickness
    severity: str = "mild"  # "minimal" | "mild" | "moderate"
    station: str | None = None  # lymph node station


@dataclass
class Canvas:
    grid: Grid
    anatomy: Anatomy
    lab: np.ndarray  # (W, H, D) uint8 tissue labels, Fortran order (as NIfTI stores it)
    hu: np.ndarray | None = None  # (W, H, D) float32 clean HU, Fortran order


def fortran_zeros(shape, dtype) -> np.ndarray:
    """Zeros of ``shape`` (W, H, D) laid out in Fortran order, so axial slices are contiguous."""
    return np.zeros(tuple(reversed(shape)), dtype).T


def apply_lut(lut: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """``lut[arr]`` keeping ``arr``'s Fortran layout (fast path for the (W, H, D) canvases)."""
    return lut[arr.T].T


# ---------------------------------------------------------------------------------------------
# Geometry helpers (all evaluated on sub-boxes of the grid)
# ---------------------------------------------------------------------------------------------
def _box(g: Grid, lo, hi) -> tuple[slice, slice, slice]:
    out = []
    for axis, a, b in zip((g.x, g.y, g.z), lo, hi):
        out.append(slice(int(np.searchsorted(axis, a)), int(np.searchsorted(axis, b, side="right"))))
    return tuple(out)


def _xyz(g: Grid, box):  # -> X (w,1,1), Y (1,h,1), Z (1,1,d)
    return g.x[box[0]][:, None, None], g.y[box[1]][None, :, None], g.z[box[2]][None, None, :]


def _ellipsoid(g: Grid, c, r):  # -> box, level (w,h,d) = sum(((p - c) / r)^2)
    c, r = np.asarray(c, np.float32), np.asarray(r, np.float32)
    box = _box(g, c - r, c + r)
    X, Y, Z = _xyz(g, box)
    return box, ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2


def _sphere(g: Grid, c, r_mm: float):  # -> box, level (w,h,d) of a ball of radius r_mm
    return _ellipsoid(g, c, r_mm / g.units)


def _segment(g: Grid, p0, p1, pad_mm: float):  # -> box, distance in mm (w,h,d) to segment p0-p1
    u = g.units.astype(np.float32)
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    box = _box(g, np.minimum(p0, p1) - pad_mm / u, np.maximum(p0, p1) + pad_mm / u)
    X, Y, Z = _xyz(g, box)
    a, d = p0 * u, (p1 - p0) * u
    px, py, pz = X * u[0] - a[0], Y * u[1] - a[1], Z * u[2] - a[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(float(d @ d), 1e-9), 0, 1)
    return box, np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)


def _allowed(labels) -> np.ndarray:  # (256,) bool lookup
    lut = np.zeros(256, bool)
    lut[list(labels)] = True
    return lut


def _paint(cv: Canvas, box, mask, label: int, over=None, keep=None) -> None:
    """Set ``label`` where ``mask``; only over labels in ``over`` / not in ``keep`` when given."""
    sub = cv.lab[box]
    if over is not None:
        mask = mask & _allowed(over)[sub]
    if keep is not None:
        mask = mask & ~_allowed(keep)[sub]
    sub[mask] = label


def _paint_hu(cv: Canvas, box, mask, value: float, mode: str = "set", within=LUNG) -> None:
    """Write HU ``value`` where ``mask`` (and the label is in ``within``); mode set|max|min."""
    sub = cv.hu[box]
    if within is not None:
        mask = mask & _allowed(within)[cv.lab[box]]
    if mode == "max":
        sub[mask] = np.maximum(sub[mask], value)
    elif mode == "min":
        sub[mask] = np.minimum(sub[mask], value)
    else:
        sub[mask] = value


def _tube(cv: Canvas, points, radius_mm: float, label: int, **kw) -> None:
    for p0, p1 in zip(points[:-1], points[1:]):
        box, dist = _segment(cv.grid, p0, p1, radius_mm)
        _paint(cv, box, dist <= radius_mm, label, **kw)


def _voxel(g: Grid, p) -> tuple[int, int, int]:
    """Index (i, j, k) of the voxel nearest to the normalised point ``p``."""
    return tuple(int(np.abs(axis - v).argmin()) for axis, v in zip((g.x, g.y, g.z), p))


def _snap(g: Grid, p) -> tuple[float, float, float]:
    """Move a normalised point onto the nearest voxel centre (so small objects never vanish)."""
    return tuple(float(axis[i]) for axis, i in zip((g.x, g.y, g.z), _voxel(g, p)))


# ---------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------
def diaphragm_z(X, Y, dome_shift: float = 0.0):
    """Z of the diaphragm under (X, Y): right dome higher (liver), posterior recesses lower."""
    g = lambda u: np.exp(-((u / 0.3) ** 2))  # noqa: E731
    return 0.17 + dome_shift + 0.10 * g(X + 0.38) + 0.07 * g(X - 0.40) - 0.10 * np.clip(Y, 0, None)


def lung_taper(Z):
    """Scale of the lung footprint at height Z (1 below Z = 0.6, 0 at the apex)."""
    t = np.clip((Z - 0.6) / (APEX_Z - 0.6), 0, 1)
    return np.sqrt(np.clip(1 - t**2, 0, 1))


def _ellipse2d(g: Grid, c, r):  # -> (W, H) level
    return ((g.x[:, None] - c[0]) / r[0]) ** 2 + ((g.y[None, :] - c[1]) / r[1]) ** 2


def _cavity_level(cv: Canvas):  # (W, H) level of the thoracic cavity ellipse (inside the ribs)
    s = cv.anatomy.body_scale
    return _ellipse2d(cv.grid, (0.0, 0.04), (0.76 * s, 0.54 * s))


def _draw_body(cv: Canvas) -> None:
    s, g = cv.anatomy.body_scale, cv.grid
    fat = 0.09 if cv.anatomy.sex == "F" else 0.07
    cv.lab[_ellipse2d(g, (0.0, 0.06), (0.90 * s, 0.68 * s)) <= 1] = FAT
    cv.lab[_ellipse2d(g, (0.0, 0.06), (0.90 * s - fat, 0.68 * s - fat)) <= 1] = MUSCLE


def _draw_abdomen(cv: Canvas) -> None:
    g, a = cv.grid, cv.anatomy
    zd = diaphragm_z(g.x[:, None], g.y[None, :], a.dome_shift)  # (W, H)
    kmax = int(np.searchsorted(g.z, zd.max(), side="right"))
    box = (slice(None), slice(None), slice(0, kmax))
    inside = (_cavity_level(cv) <= 1)[:, :, None] & (g.z[None, None, :kmax] < zd[:, :, None])
    _paint(cv, box, inside, ABD_OTHER)
    liver = (_ellipse2d(g, (-0.30, 0.0), (0.50, 0.52)) <= 1)[:, :, None] & inside
    _paint(cv, box, liver, LIVER)
    ebox, level = _ellipsoid(g, (0.56, 0.32, 0.10), (0.15, 0.20, 0.12))
    _paint(cv, ebox, level <= 1, SPLEEN, over=(ABD_OTHER,))
    ebox, level = _ellipsoid(g, (0.36, -0.08, 0.10), (0.24, 0.24, 0.12))
    _paint(cv, ebox, level <= 1, STOMACH, over=(ABD_OTHER,))
    Y = _xyz(g, ebox)[1]  # gas rises anteriorly in a supine patient
    _paint(cv, ebox, (level <= 0.8) & (Y < -0.18), STOMACH_GAS, over=(STOMACH,))


def _draw_mediastinum(cv: Canvas) -> None:
    g = cv.grid
    box = _box(g, (-0.12, -0.52, 0.0), (0.14, 0.30, 0.92))
    X, Y, Z = _xyz(g, box)
    band = Z > diaphragm_z(X, Y, cv.anatomy.dome_shift)  # (w,h,d)
    _paint(cv, box, band, MED_FAT, over=(MUSCLE,))


def _lung_level(cv: Canvas, side: str):  # -> box, level (w,h,d) of the tapered footprint, X, Y, Z
    _, _, _, c, r = LUNG_GEOM[side]
    g = cv.grid
    box = _box(g, (c[0] - r[0], c[1] - r[1], 0.0), (c[0] + r[0], c[1] + r[1], APEX_Z))
    X, Y, Z = _xyz(g, box)
    flat = ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2  # (w,h,1)
    taper = lung_taper(Z)
    level = flat / np.maximum(taper, 1e-3) ** 2  # (w,h,d)
    return box, level, X, Y, Z


def _draw_lung(cv: Canvas, side: str, effusion: Finding | None) -> Finding | None:
    lung, pleura, fluid, c, r = LUNG_GEOM[side]
    g = cv.grid
    box, level, X, Y, Z = _lung_level(cv, side)
    above = Z > diaphragm_z(X, Y, cv.anatomy.dome_shift)
    inside = (level <= 1) & above & (_cavity_level(cv)[box[0], box[1]] <= 1)[:, :, None]
    _paint(cv, box, inside, lung, over=(MUSCLE,))
    ring_mm = max(1.2 * max(g.spacing[:2]), 0.03 * g.units[0])
    ring = (1 - ring_mm / (r[0] * g.units[0])) ** 2
    _paint(cv, box, inside & (level > ring), pleura, over=(lung,))
    if effusion is None:
        return None
    depth = {"minimal": 0.16, "mild": 0.26, "moderate": 0.38}[effusion.severity]
    frac = depth * np.clip(1 - (Z - 0.12) / 0.38, 0, 1)  # (1,1,d) fraction of the AP diameter
    fl = inside & (Y - c[1] > (1 - 2 * frac) * r[1] * lung_taper(Z))
    _paint(cv, box, fl, fluid, over=(lung, pleura))
    return dataclasses.replace(effusion, size_mm=round(float(2 * depth * r[1] * g.units[1])))


def _heart_geom(cv: Canvas, cardiomegaly: Finding | None):  # -> centre, semi-axes (normalised)
    a = cv.anatomy
    k = 1.0 if cardiomegaly is None else {"mild": 1.28, "moderate": 1.42}.get(cardiomegaly.severity, 1.3)
    r = np.array([0.30 * k, 0.25 * k, 0.13 * (1 + (k - 1) * 0.5)]) * a.heart_scale
    c = np.array([0.12 + a.heart_shift + 0.25 * (r[0] - 0.30), -0.12, 0.20 + a.dome_shift + r[2]])
    return c, r


def _draw_heart(cv: Canvas, cardiomegaly, effusion) -> Finding | None:
    c, r = _heart_geom(cv, cardiomegaly)
    keep = BONE + (AORTA, ESOPH)
    if effusion is not None:
        semi_mm = float(min(r[0] * cv.grid.units[0], r[1] * cv.grid.units[1]))
        rim = {"minimal": 1.12, "mild": 1.17, "moderate": 1.24}[effusion.severity]
        rim = max(rim, 1 + 2.5 * max(cv.grid.spacing[:2]) / semi_mm)  # at least ~2.5 voxels thick
        box, level = _ellipsoid(cv.grid, c, r * rim)
        _paint(cv, box, level <= 1, PERI_FLUID, keep=keep)
    box, level = _ellipsoid(cv.grid, c, r)
    _paint(cv, box, level <= 1, EPI_FAT, keep=keep + (PERI_FLUID,))
    _paint(cv, box, level <= 0.9**2, HEART, keep=keep)
    if effusion is None:
        return None
    thick = (rim - 1) * semi_mm
    return dataclasses.replace(effusion, size_mm=max(1.0, round(thick)))


def aorta_path(cv: Canvas) -> list[tuple[float, float, float]]:
    c, r = _heart_geom(cv, None)
    top = float(c[2] + 0.6 * r[2])
    return [(0.02, -0.10, top), (-0.03, -0.16, 0.74), (0.06, -0.15, 0.80), (0.14, -0.02, 0.81),
            (0.15, 0.14, 0.77), (0.15, 0.22, 0.70), (0.13, 0.24, 0.0)]


def _draw_vessels_airways(cv: Canvas) -> None:
    g, ux = cv.grid, float(cv.grid.units[0])
    path = aorta_path(cv)
    for i, rad in enumerate((0.07, 0.068, 0.065, 0.06, 0.056, 0.055)):
        _tube(cv, path[i:i + 2], rad * ux, AORTA, keep=BONE)
    zd = float(diaphragm_z(0.13, 0.24, cv.anatomy.dome_shift))
    box, dist = _segment(g, (0.13, 0.24, zd), (0.13, 0.24, 0.0), 0.06 * ux)
    _paint(cv, box, dist <= 0.055 * ux, AORTA_ABD, over=(AORTA,))
    _tube(cv, [(0.02, 0.06, 1.0), (0.03, 0.14, 0.62), (0.06, 0.17, 0.32), (0.20, 0.06, 0.17),
               (0.30, -0.02, 0.12)], 0.038 * ux, ESOPH, keep=BONE + (AORTA, AORTA_ABD))
    _draw_thyroid(cv)
    carina = (0.0, 0.0, 0.64)
    for pts, rad in (([(0.0, -0.10, 1.0), carina], 0.06), ([carina, HILUM["right"]], 0.045),
                     ([carina, HILUM["left"]], 0.04)):
        _tube(cv, pts, rad * ux, TRACHEA_WALL, keep=BONE)
        _tube(cv, pts, 0.72 * rad * ux, TRACHEA_AIR, keep=BONE)


def _draw_thyroid(cv: Canvas) -> None:
    for c, r in (((-0.11, -0.12, 0.95), (0.045, 0.05, 0.06)), ((0.11, -0.12, 0.95), (0.045, 0.05, 0.06)),
                 ((0.0, -0.17, 0.93), (0.08, 0.025, 0.025))):
        box, level = _ellipsoid(cv.grid, c, r)
        _paint(cv, box, level <= 1, THYROID, keep=BONE)


def _draw_spine(cv: Canvas) -> None:
    g = cv.grid
    body = _ellipse2d(g, (0.0, 0.38), (0.095, 0.095))  # (W, H)
    canal = _ellipse2d(g, (0.0, 0.53), (0.045, 0.045))
    arch = _ellipse2d(g, (0.0, 0.53), (0.085, 0.085)) <= 1
    spinous = (np.abs(g.x)[:, None] < 0.025) & (g.y[None, :] > 0.55) & (g.y[None, :] < 0.66)
    cv.lab[(body <= 1) | arch | spinous] = VERT_CORTEX
    cv.lab[body <= 0.75**2] = VERT_MARROW
    cv.lab[canal <= 1] = CANAL
    disc = ((g.z * 14.0) % 1.0) < 0.12  # (D,) 14 vertebrae over the scan
    for k in np.flatnonzero(disc):
        cv.lab[:, :, k][body <= 1] = DISC


def _draw_ribs_sternum(cv: Canvas) -> None:
    g = cv.grid
    lvl = np.sqrt(_cavity_level(cv))
    ring = (lvl > 1.0) & (lvl < 1.09)
    ring &= ~((g.y[None, :] < -0.2) & (np.abs(g.x)[:, None] < 0.4)) & ~(np.abs(g.x)[:, None] < 0.12)
    d = g.shape[2]
    n = max(1, int(round(0.3 * 0.8 / 12 * d)))  # rib height in slices: ~30% of the rib spacing
    for r in range(12):
        k = int((0.12 + 0.8 * (r + 0.5) / 12) * d) - n // 2
        sub = cv.lab[:, :, max(0, k):k + n]
        sub[ring & (sub[:, :, 0] == MUSCLE)] = RIB
    box = _box(g, (-1, -1, 0.42), (1, 1, 0.88))
    sternum = _ellipse2d(g, (0.0, -0.52), (0.08, 0.03)) <= 1
    cv.lab[box][sternum] = STERNUM


def _draw_breast(cv: Canvas) -> None:
    female = cv.anatomy.sex == "F"
    r = (0.24, 0.16, 0.13) if female else (0.14, 0.07, 0.07)
    for cx in (-0.40, 0.40):
        box, level = _ellipsoid(cv.grid, (cx, -0.60, 0.52), r)
        _paint(cv, box, level <= 1, BREAST_FAT, over=(AIR, FAT))
        if female:
            _paint(cv, box, level <= 0.3, BREAST_GLAND, over=(BREAST_FAT,))


NODE_STATIONS = {"right paratracheal": (-0.09, -0.07, 0.74), "subcarinal": (0.0, 0.09, 0.58),
                 "aortopulmonary window": (0.09, -0.05, 0.71), "prevascular": (0.0, -0.30, 0.72)}


def _draw_nodes(cv: Canvas, f: Finding, rng: np.random.Generator) -> Finding:
    stations = list(NODE_STATIONS)
    n = int(rng.integers(3, 5))
    picked = [stations[i] for i in sorted(rng.choice(len(stations), size=n, replace=False))]
    g = cv.grid
    r_mm = max(float(rng.uniform(0.06, 0.08) * g.units[0]), 3.5 * max(g.spacing[:2]))
    r = np.array([r_mm, r_mm, max(r_mm, 1.2 * g.spacing[2])]) / g.units  # ovoid, >= 2 slices tall
    for name in picked:
        box, level = _ellipsoid(g, _snap(g, NODE_STATIONS[name]), r)
        _paint(cv, box, level <= 1, NODE, over=(MED_FAT, MUSCLE, LUNG_R, LUNG_L, PLEURA_R, PLEURA_L))
    size = round(2 * r_mm)  # short axis; reports only quote sizes that look pathological (>= 10 mm)
    station = picked[0] if n == 1 else ", ".join(picked[:-1]) + " and " + picked[-1]
    return dataclasses.replace(f, size_mm=size if size >= 10 else None, station=station)


def _draw_hernia(cv: Canvas, f: Finding) -> Finding:
    g = cv.grid
    c = np.array([0.10, 0.12, float(diaphragm_z(0.10, 0.12, cv.anatomy.dome_shift)) + 0.05])
    r = np.array([0.11, 0.09, 0.06])
    box, level = _ellipsoid(g, c, r)
    keep = BONE + (AORTA, AORTA_ABD)
    _paint(cv, box, level <= 1, HERNIA_WALL, keep=keep)
    Y = _xyz(g, box)[1]
    _paint(cv, box, (level <= 0.45) & (Y < c[1]), HERNIA_GAS, keep=keep)
    return dataclasses.replace(f, size_mm=round(float(2 * r[0] * g.units[0])))


def draw_labels(grid: Grid, anatomy: Anatomy, plan: dict[str, Finding], rng) -> tuple[Canvas, dict]:
    """Paint the tissue-label map, including the abnormalities that change anatomy."""
    cv = Canvas(grid, anatomy, fortran_zeros(grid.shape, np.uint8))  # (W, H, D)
    found = dict(plan)
    _draw_body(cv)
    _draw_abdomen(cv)
    _draw_mediastinum(cv)
    eff = plan.get("Pleural effusion")
    for side in ("right", "left"):
        use = eff if eff is not None and eff.side in (side, "both") else None
        drawn = _draw_lung(cv, side, use)
        if drawn is not None:
            found["Pleural effusion"] = drawn
    drawn = _draw_heart(cv, plan.get("Cardiomegaly"), plan.get("Pericardial effusion"))
    if drawn is not None:
        found["Pericardial effusion"] = drawn
    _draw_vessels_airways(cv)
    if "Hiatal hernia" in plan:
        found["Hiatal hernia"] = _draw_hernia(cv, plan["Hiatal hernia"])
    if "Lymphadenopathy" in plan:
        found["Lymphadenopathy"] = _draw_nodes(cv, plan["Lymphadenopathy"], rng)
    _draw_spine(cv)
    _draw_ribs_sternum(cv)
    _draw_breast(cv)
    return cv, found


# ---------------------------------------------------------------------------------------------
# Lung texture and lesions (HU pass)
# ---------------------------------------------------------------------------------------------
def _lung_semi_mm(g: Grid, side: str) -> float:
    r = LUNG_GEOM[side][4]
    return float(min(r[0] * g.units[0], r[1] * g.units[1]))


LUNG_HALF_Z = (APEX_Z - 0.17) / 2  # half the lung's height (diaphragm to apex), normalised Z


def lung_semi_axes(side: str) -> np.ndarray:  # (3,) the lung's semi-axes, normalised (X, Y, Z)
    r = LUNG_GEOM[side][4]
    return np.array([r[0], r[1], LUNG_HALF_Z], np.float32)


def _lung_blob(cv: Canvas, c, side: str, rel: float, value: float, mode: str) -> None:
    """An ellipsoid ``rel`` times the lung's own semi-axes (at least ~1.5 voxels on every axis).

    Textural lesions (ground glass, consolidation, emphysema) are sized against the lung, on every
    axis, as the anatomy is: a lesion sized in millimetres would be a one-slice disc on a grid whose
    slices are several times thicker than its pixels, and a few voxels on a small field of view."""
    g = cv.grid
    floor = 1.5 * np.array(g.spacing, np.float32) / g.units
    box, level = _ellipsoid(g, c, np.maximum(rel * lung_semi_axes(side), floor))
    _paint_hu(cv, box, level <= 1, value, mode)


def lung_point(cv: Canvas, side: str, lobe: str, rng, margin_mm: float = 0.0):
    """A voxel-centred point inside ``side``'s lung in ``lobe`` (at least ``margin_mm`` inside)."""
    g, (lung, _, _, c, r) = cv.grid, LUNG_GEOM[side]
    (x0, x1), (y0, y1), (z0, z1) = LOBE_BOX[lobe]
    best = None
    for attempt in range(80):
        xl, yl, zr = rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(z0, z1)
        X, Y = c[0] + xl * r[0], c[1] + yl * r[1]
        zlo = float(diaphragm_z(X, Y, cv.anatomy.dome_shift))
        p = _snap(g, (X, Y, zlo + zr * (APEX_Z - zlo)))
        if cv.lab[_voxel(g, p)] != lung:
            continue
        best = best or p
        m = 0.0 if attempt >= 60 else margin_mm
        if all(cv.lab[_voxel(g, q)] == lung for q in _around(g, p, m)):
            return p
    return best if best is not None else _any_lung_voxel(cv, lung)


def _around(g: Grid, p, mm: float):
    d = mm / g.units
    for axis in range(3):
        for s in (-1, 1):
            q = list(p)
            q[axis] += s * d[axis]
            yield q


def _any_lung_voxel(cv: Canvas, lung: int):
    idx = np.argwhere(cv.lab == lung)
    if len(idx) == 0:
        raise ValueError("the volume is too small to hold a lung; use a larger shape")
    i, j, k = idx[len(idx) // 2]
    return float(cv.grid.x[i]), float(cv.grid.y[j]), float(cv.grid.z[k])


def _sides(f: Finding) -> tuple[str, ...]:
    return ("right", "left") if f.side == "both" else (f.side or "right",)


def _lung_gradient(cv: Canvas) -> None:
    """Dependent (posterior) lung is slightly denser, as on supine CT."""
    for side in ("right", "left"):
        box, _, _, Y, _ = _lung_level(cv, side)
        m = _allowed(LUNG)[cv.lab[box]]
        sub = cv.hu[box]
        sub[m] += np.broadcast_to(35 * Y, m.shape)[m]


def _draw_vessels(cv: Canvas, rng) -> None:
    """Pulmonary vessels (dense tubes) and thin-walled bronchi fanning out of each hilum."""
    g, ux = cv.grid, float(cv.grid.units[0])
    floor = 0.6 * min(g.spacing[:2])
    for side in ("right", "left"):
        h = HILUM[side]
        for n in range(7):
            lobe = ("upper", "lower", "middle" if side == "right" else "upper")[n % 3]
            end = lung_point(cv, side, lobe, rng)
            mid = tuple(0.5 * (a + b) for a, b in zip(h, end))
            for p0, p1, rad in ((h, mid, 0.018), (mid, end, 0.011)):
                box, dist = _segment(g, p0, p1, max(rad * ux, floor))
                _paint_hu(cv, box, dist <= max(rad * ux, floor), 40, "max")


def _airways(cv: Canvas, side: str, lobe: str, n: int, lumen_mm: float, wall_mm: float, wall_hu, rng):
    g = cv.grid
    for _ in range(n):
        end = lung_point(cv, side, lobe, rng)
        start = tuple(0.6 * a + 0.4 * b for a, b in zip(HILUM[side], end))
        box, dist = _segment(g, start, end, lumen_mm + wall_mm)
        _paint_hu(cv, box, dist <= lumen_mm + wall_mm, wall_hu, "max")
        _paint_hu(cv, box, dist <= lumen_mm, -950)


def _draw_bronchi(cv: Canvas, f: Finding | None, rng) -> None:
    g, ux = cv.grid, float(cv.grid.units[0])
    lumen = max(0.8 * g.spacing[0], 0.012 * ux)
    for side in ("right", "left"):
        thick = f is not None and side in _sides(f)
        wall = lumen * (1.2 if thick else 0.45)
        _airways(cv, side, "upper", 3 if thick else 2, lumen, wall, 40 if thick else -300, rng)


def _blob(cv: Canvas, c, r_mm: float, value: float, mode: str) -> None:
    box, level = _sphere(cv.grid, c, r_mm)
    _paint_hu(cv, box, level <= 1, value, mode)


def _spot(cv: Canvas, p, r_mm: float, value: float) -> None:
    """A small bright calcification, at least ~1.5 voxels wide and one slice tall."""
    g = cv.grid
    r = max(r_mm, 1.5 * max(g.spacing[:2]))
    box, level = _ellipsoid(g, _snap(g, p), np.array([r, r, max(r, 0.6 * g.spacing[2])]) / g.units)
    _paint_hu(cv, box, level <= 1, value, "max", within=None)


def _draw_nodule(cv: Canvas, f: Finding, rng) -> Finding:
    d = min(float(rng.uniform(5, 12)), 0.7 * _lung_semi_mm(cv.grid, f.side))
    d = float(max(1, round(d)))
    c = lung_point(cv, f.side, f.lobe, rng, margin_mm=d / 2)
    _blob(cv, c, d / 2, 50, "set")
    return dataclasses.replace(f, size_mm=d)


def _draw_patches(cv: Canvas, f: Finding, rng, n: int, rel: tuple[float, float], hu: float, mode: str):
    for side in _sides(f):
        for _ in range(n):
            c = lung_point(cv, side, f.lobe or "upper", rng)
            _lung_blob(cv, c, side, float(rng.uniform(*rel)), hu, mode)


def _draw_consolidation(cv: Canvas, f: Finding, rng) -> None:
    semi = _lung_semi_mm(cv.grid, f.side)
    c = np.array(lung_point(cv, f.side, f.lobe, rng, margin_mm=0.3 * semi))
    for _ in range(3):
        off = rng.uniform(-0.2, 0.2, 3) * lung_semi_axes(f.side)
        _lung_blob(cv, tuple(c + off), f.side, float(rng.uniform(0.3, 0.45)), 30, "set")
    air = max(0.6 * cv.grid.spacing[0], 0.006 * cv.grid.units[0])
    box, dist = _segment(cv.grid, tuple(c), tuple(0.5 * (c + np.array(HILUM[f.side]))), air)
    _paint_hu(cv, box, (dist <= air) & (cv.hu[box] > -100), -900)


def _draw_atelectasis(cv: Canvas, f: Finding) -> None:
    _, _, _, c, r = LUNG_GEOM[f.side]
    box, _, X, Y, Z = _lung_level(cv, f.side)
    zd = diaphragm_z(X, Y, cv.anatomy.dome_shift)
    band = (Z < zd + 0.09) & ((Y - c[1]) / r[1] > 0.2) & (np.abs(X - c[0]) / r[0] < 0.7)
    _paint_hu(cv, box, band, -40)


def _draw_fibrosis(cv: Canvas, f: Finding, rng) -> None:
    g = cv.grid
    rad = max(0.7 * g.spacing[0], 0.01 * g.units[0])
    _, _, _, c, _ = LUNG_GEOM[f.side]
    for _ in range(3):
        p = np.array(lung_point(cv, f.side, f.lobe, rng))
        q = p + np.array([c[0] - p[0], 0, 0]) * 0.5 + np.array([0, 0, rng.uniform(-0.03, 0.03)])
        outer = p + (p - q) * 0.6
        box, dist = _segment(g, tuple(outer), tuple(q), rad)
        _paint_hu(cv, box, dist <= rad, -150, "max")


def _draw_mosaic(cv: Canvas, f: Finding, rng) -> None:
    waves = [(rng.normal(size=3), rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    for side in _sides(f):
        u = 1 / lung_semi_axes(side)  # lobular patches ~0.8 lung semi-axes apart on every axis
        box, _, X, Y, Z = _lung_level(cv, side)
        field = np.zeros(cv.hu[box].shape, np.float32)
        for k, phase in waves:
            k = k / np.linalg.norm(k) * 2 * np.pi / 0.8
            field += np.sin(X * (u[0] * k[0]) + Y * (u[1] * k[1]) + Z * (u[2] * k[2]) + phase)
        m = _allowed(LUNG)[cv.lab[box]]
        cv.hu[box][m] += np.where(field > 0, 55, -65).astype(np.float32)[m]


def _draw_septal(cv: Canvas, f: Finding, rng) -> None:
    g = cv.grid
    period = max(5 * g.spacing[0], 0.08 * g.units[0])
    width = max(0.9 * g.spacing[0], 0.1 * period)
    a = rng.uniform(0, np.pi / 2)
    xm, ym = g.x[:, None] * g.units[0], g.y[None, :] * g.units[1]  # (W,1), (1,H) mm
    grid2d = np.zeros(g.shape[:2], bool)
    for ang in (a, a + np.pi / 2):
        t = (xm * np.cos(ang) + ym * np.sin(ang)) % period
        grid2d |= np.abs(t - period / 2) >= period / 2 - width / 2
    for side in _sides(f):
        box, level, _, _, Z = _lung_level(cv, side)
        zone = (level > 0.4) & (Z < 0.5) & grid2d[box[0], box[1]][:, :, None]
        _paint_hu(cv, box, zone, -350, "max")


def _draw_calcs_aorta(cv: Canvas, rng) -> None:
    g, ux = cv.grid, float(cv.grid.units[0])
    path = aorta_path(cv)
    for _ in range(int(rng.integers(8, 14))):
        i = int(rng.integers(2, len(path) - 1))
        t = rng.uniform(0, 1)
        p = np.array(path[i]) * (1 - t) + np.array(path[i + 1]) * t
        ang = rng.uniform(0, 2 * np.pi)
        p = p + 0.058 * np.array([np.cos(ang), np.sin(ang), 0.0]) * np.array([1, g.units[0] / g.units[1], 0])
        _spot(cv, p, max(2.0, 0.02 * ux), 1000)


def _draw_calcs_coronary(cv: Canvas, rng) -> None:
    g = cv.grid
    c, r = _heart_geom(cv, None)
    for _ in range(int(rng.integers(6, 10))):
        d = np.array([rng.uniform(-0.4, 0.9), rng.uniform(-1.0, -0.4), rng.uniform(0.0, 0.7)])
        p = c + 0.965 * r * d / np.linalg.norm(d)
        _spot(cv, p, max(2.0, 0.018 * g.units[0]), 1000)


def _draw_catheter(cv: Canvas) -> None:
    g = cv.grid
    port = (-0.48, -0.48, 0.76)  # subcutaneous, right anterior chest wall
    path = [port, (-0.18, -0.30, 0.86), (-0.10, -0.18, 0.74), (-0.06, -0.13, 0.50)]
    rad = max(1.2, 0.8 * g.spacing[0])
    for p0, p1 in zip(path[:-1], path[1:]):
        box, dist = _segment(g, p0, p1, rad)
        _paint_hu(cv, box, dist <= rad, 3000, "set", within=None)
    box, level = _ellipsoid(g, port, (0.07, 0.03, 0.03))
    _paint_hu(cv, box, level <= 1, 2500, "set", within=None)


def draw_hu(cv: Canvas, found: dict[str, Finding], rng) -> dict[str, Finding]:
    """Clean HU (``cv.hu``, (W, H, D) float32) with all in-lung lesions and bright findings."""
    cv.hu = apply_lut(HU_LUT, cv.lab)  # (W, H, D) float32, Fortran order
    found = dict(found)
    _lung_gradient(cv)
    if "Mosaic attenuation pattern" in found:
        _draw_mosaic(cv, found["Mosaic attenuation pattern"], rng)
    if "Emphysema" in found:
        _draw_patches(cv, found["Emphysema"], rng, 6, (0.15, 0.3), -985, "min")
    _draw_vessels(cv, rng)
    _draw_bronchi(cv, found.get("Peribronchial thickening"), rng)
    _draw_lesions(cv, found, rng)
    if "Arterial wall calcification" in found:
        _draw_calcs_aorta(cv, rng)
    if "Coronary artery wall calcification" in found:
        _draw_calcs_coronary(cv, rng)
    if "Medical material" in found:
        _draw_catheter(cv)
    return found


def _draw_lesions(cv: Canvas, found: dict[str, Finding], rng) -> None:
    ux = float(cv.grid.units[0])
    if "Lung opacity" in found:
        _draw_patches(cv, found["Lung opacity"], rng, 2, (0.25, 0.4), -600, "max")
    if "Consolidation" in found:
        _draw_consolidation(cv, found["Consolidation"], rng)
    if "Atelectasis" in found:
        for side in _sides(found["Atelectasis"]):
            _draw_atelectasis(cv, dataclasses.replace(found["Atelectasis"], side=side))
    if "Pulmonary fibrotic sequela" in found:
        _draw_fibrosis(cv, found["Pulmonary fibrotic sequela"], rng)
    if "Interlobular septal thickening" in found:
        _draw_septal(cv, found["Interlobular septal thickening"], rng)
    if "Bronchiectasis" in found:
        f = found["Bronchiectasis"]
        lumen = max(1.3 * cv.grid.spacing[0], 0.028 * ux)
        for side in _sides(f):
            _airways(cv, side, "lower", 3, lumen, max(0.8 * cv.grid.spacing[0], 0.01 * ux), 30, rng)
    if "Lung nodule" in found:
        found["Lung nodule"] = _draw_nodule(cv, found["Lung nodule"], rng)


# ---------------------------------------------------------------------------------------------
# Reconstruction: blur + noise + field of view
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """A reconstruction flavour: in-plane/through-plane blur (voxels) and noise (HU)."""

    name: str
    blur_xy: float
    blur_z: float
    noise_hu: float


KERNELS = (Kernel("B30f", 0.8, 0.5, 12.0), Kernel("B70f", 0.45, 0.3, 20.0))
_CHUNK = 8  # noise is drawn in fixed slabs of slices so memory stays low and the stream is stable


def render(hu_clean: np.ndarray, kernel: Kernel, rng: np.random.Generator) -> np.ndarray:
    """Blurred, noisy HU (W, H, D) float32; -1024 outside the circular field of view."""
    out = np.empty_like(hu_clean)  # keeps the Fortran layout
    ndimage.gaussian_filter(hu_clean, (kernel.blur_xy, kernel.blur_xy, kernel.blur_z), output=out, truncate=3.0)
    for k0 in range(0, out.shape[2], _CHUNK):
        slab = out[:, :, k0:k0 + _CHUNK]  # (W, H, chunk), contiguous in Fortran order
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(kernel.noise_hu)
    w, h = out.shape[:2]
    xi = (np.arange(w) + 0.5) / w * 2 - 1
    yj = (np.arange(h) + 0.5) / h * 2 - 1
    out[(xi[:, None] ** 2 + yj[None, :] ** 2) > 1.0] = -1024
    np.clip(out, -1024, 3071, out=out)
    return out
