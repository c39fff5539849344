"""Deterministic synthetic TotalSegmentator (v2) dataset in the real on-disk layout.

``make_synthetic_totalseg(out, n)`` writes, under ``out``::

    s0000/ct.nii.gz                         int16 HU, RAS (as TotalSegmentator's resampled CTs)
    s0000/segmentations/<structure>.nii.gz  uint8 {0, 1}, one file per structure in :data:`STRUCTURES`,
                                            written for every case (empty where the structure is absent)
    ...
    meta.csv                                semicolon-separated, UTF-8 with a BOM, TotalSegmentator's columns
                                            (image_id;age;gender;...;split;...), split train / val / test

The image is the chest phantom of :mod:`mv3dtk.data.phantom` (the one ``mv3d synth`` draws for CT-RATE), and every
mask is a set of its tissue labels, so masks and image agree voxel for voxel. Each case varies (seeded): the
patient's anatomy (:func:`phantom.sample_anatomy`), a pose (:func:`sample_pose`: the body drawn larger or smaller
than the field of view and shifted in it, a random window of slices kept) and, in some cases, a pleural effusion
(fluid replacing the lower lung) or cardiomegaly, so a network must look at the image to find the organs. The lung
lobes are cut from the phantom's lungs by an oblique fissure (and, on the right, a horizontal one); vertebrae are
numbered by the phantom's discs.

Everything is a function of ``(seed, case index)``: adding cases never changes earlier ones, and identical
arguments give byte-identical files. Files are written atomically (:func:`mv3dtk.fs.atomic_path`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mv3dtk.data import phantom
from mv3dtk.data.phantom import Finding
from mv3dtk.data.synth import nifti_bytes, write_gz
from mv3dtk.fs import atomic_write_text

META_COLUMNS = ("image_id", "age", "gender", "institute", "study_type", "split", "manufacturer", "scanner_model",
                "kvp", "pathology", "pathology_location")
P = phantom
# TotalSegmentator v2 structure name -> phantom tissue labels (lobes and vertebrae are cut from these below).
ORGANS: dict[str, tuple[int, ...]] = {
    "heart": (P.HEART,),
    "aorta": (P.AORTA, P.AORTA_ABD),
    "esophagus": (P.ESOPH,),
    "trachea": (P.TRACHEA_WALL, P.TRACHEA_AIR),
    "thyroid_gland": (P.THYROID,),
    "liver": (P.LIVER,),
    "spleen": (P.SPLEEN,),
    "stomach": (P.STOMACH, P.STOMACH_GAS),
    "sternum": (P.STERNUM,),
    "spinal_cord": (P.CANAL,),
}
LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
         "lung_lower_lobe_right")
# The phantom's 14 vertebrae per unit of Z (its discs at (14 Z) % 1 < 0.12), named top-down: Z in [0, 1) spans
# T1 .. L2 (floor(14 Z) = 13 is T1).
VERTEBRAE = tuple(f"T{i}" for i in range(1, 13)) + ("L1", "L2")
STRUCTURES: tuple[str, ...] = tuple(sorted((*ORGANS, *LOBES, *(f"vertebrae_{v}" for v in VERTEBRAE))))
SPLIT_EVERY = {8: "val", 9: "test"}  # case index % 10 -> split (the rest: train), about TotalSegmentator's shares


@dataclass(frozen=True)
class TotalSegSummary:
    root: Path
    cases: tuple[str, ...]
    splits: dict[str, str] = field(hash=False)  # case -> train | val | test
    structures: tuple[str, ...] = STRUCTURES
    files_written: int = 0


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([0x7517, *key]))  # 0x7517: apart from synth's streams


def _check_args(n, shape, spacing, seed) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (number of cases), got {n!r}")
    if len(tuple(shape)) != 3 or any(not isinstance(s, (int, np.integer)) or s < 16 for s in shape):
        raise ValueError(f"shape must be 3 integers (D, H, W), each >= 16, got {shape!r}")
    if len(tuple(spacing)) != 3 or any(not (float(s) > 0 and math.isfinite(float(s))) for s in spacing):
        raise ValueError(f"spacing must be 3 finite numbers (z, y, x) in mm, each > 0, got {spacing!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pose:
    """Where the drawn canvas (the phantom filling its own field of view) sits in the case's (W, H, D) grid: the
    canvas's shape and the output index of its voxel (0, 0, 0) per axis (negative: cropped)."""

    canvas: tuple[int, int, int]
    offset: tuple[int, int, int]


def sample_pose(shape_whd: tuple[int, int, int], rng: np.random.Generator) -> Pose:
    """In-plane: the body drawn 0.85..1.1 times the field of view and shifted up to a tenth of it (padded with air
    or cropped); through-plane: 0..12 % more slices drawn than kept, a random window of them kept (never padded)."""
    w, h, d = shape_whd
    scale = rng.uniform(0.85, 1.1)
    canvas = (max(8, round(w * scale)), max(8, round(h * scale)), d + int(rng.integers(0, max(1, round(0.12 * d)) + 1)))
    offset = tuple(int(round((n - c) / 2 + rng.uniform(-0.1, 0.1) * n)) for n, c in zip((w, h), canvas[:2]))
    return Pose(canvas, (*offset, -int(rng.integers(0, canvas[2] - d + 1))))


def place(arr: np.ndarray, pose: Pose, shape_whd: tuple[int, int, int], fill) -> np.ndarray:
    """The canvas array ``arr`` (W', H', D') put into a (W, H, D) array at ``pose.offset``, ``fill`` elsewhere."""
    out = phantom.fortran_zeros(shape_whd, arr.dtype)
    out[...] = fill
    dst, src = [], []
    for o, n_out, n_in in zip(pose.offset, shape_whd, arr.shape):
        lo, hi = max(0, o), min(n_out, o + n_in)
        dst.append(slice(lo, hi))
        src.append(slice(lo - o, hi - o))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _plan(rng: np.random.Generator) -> dict[str, Finding]:
    """Findings that change the organs' shapes: an effusion takes lung, cardiomegaly enlarges the heart."""
    plan = {}
    if rng.random() < 0.35:
        side = str(rng.choice(["right", "left", "both"]))
        plan["Pleural effusion"] = Finding("Pleural effusion", side=side,
                                           severity=str(rng.choice(["mild", "moderate"])))
    if rng.random() < 0.3:
        plan["Cardiomegaly"] = Finding("Cardiomegaly", severity=str(rng.choice(["mild", "moderate"])))
    return plan


def _lut(labels) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    lut[list(labels)] = 1
    return lut


def structure_masks(cv: phantom.Canvas) -> dict[str, np.ndarray]:
    """Every structure of :data:`STRUCTURES` as a (W, H, D) uint8 {0, 1} mask on the canvas's grid."""
    g = cv.grid
    Y, Z = g.y[None, :, None], g.z[None, None, :]
    out = {name: phantom.apply_lut(_lut(labels), cv.lab) for name, labels in ORGANS.items()}
    lower = Z < 0.5 + 0.5 * Y  # the oblique fissure: posterior-superior to anterior-inferior (Y > 0: posterior)
    middle = ~lower & (Z < 0.55)  # right lung, under the horizontal fissure
    for side, (lung, pleura, *_rest) in P.LUNG_GEOM.items():
        lung_mask = phantom.apply_lut(_lut((lung, pleura)), cv.lab).astype(bool)
        out[f"lung_lower_lobe_{side}"] = lung_mask & lower
        if side == "right":
            out["lung_middle_lobe_right"] = lung_mask & middle
            out["lung_upper_lobe_right"] = lung_mask & ~lower & ~middle
        else:
            out["lung_upper_lobe_left"] = lung_mask & ~lower
    bone = phantom.apply_lut(_lut((P.VERT_CORTEX, P.VERT_MARROW)), cv.lab).astype(bool)
    level = np.floor(g.z * 14).astype(int)  # (D,) vertebra of each slice, T1 = 13
    for i, name in enumerate(VERTEBRAE):
        out[f"vertebrae_{name}"] = bone & (level == 13 - i)[None, None, :]
    return {name: out[name].astype(np.uint8) for name in STRUCTURES}


def _ras(arr: np.ndarray) -> np.ndarray:
    """(W, H, D) drawn toward patient left / posterior -> toward right / anterior (RAS), as TotalSegmentator's CTs."""
    return arr[::-1, ::-1, :]


def _affine(grid: phantom.Grid, rng: np.random.Generator) -> np.ndarray:
    (w, h, _), (sx, sy, sz) = grid.shape, grid.spacing
    origin = (-(w - 1) * sx / 2, -(h - 1) * sy / 2 + float(rng.uniform(-20, 20)), -float(rng.uniform(100, 400)))
    return np.array([[sx, 0, 0, origin[0]], [0, sy, 0, origin[1]], [0, 0, sz, origin[2]], [0, 0, 0, 1]], float)


def _make_case(root: Path, case: str, grid: phantom.Grid, seed: int, index: int) -> tuple[int, str]:
    anatomy_rng, pose_rng, plan_rng, draw_rng, noise_rng, geo_rng = (
        np.random.default_rng(c) for c in np.random.SeedSequence([0x7517, seed, index]).spawn(6))
    anatomy = phantom.sample_anatomy(anatomy_rng)
    pose = sample_pose(grid.shape, pose_rng)
    cgrid = phantom.make_grid(pose.canvas, grid.spacing)
    canvas, found = phantom.draw_labels(cgrid, anatomy, _plan(plan_rng), draw_rng)
    phantom.draw_hu(canvas, found, draw_rng)
    clean = place(canvas.hu, pose, grid.shape, phantom.TISSUE_HU[P.AIR])
    hu = phantom.render(clean, phantom.KERNELS[0], noise_rng)  # (W, H, D) float32
    np.rint(hu, out=hu)
    affine = _affine(grid, geo_rng)
    write_gz(root / case / "ct.nii.gz", nifti_bytes(_ras(hu.astype(np.int16)), affine))
    written = 1
    for name, mask in structure_masks(canvas).items():
        mask = place(mask, pose, grid.shape, 0)
        write_gz(root / case / "segmentations" / f"{name}.nii.gz", nifti_bytes(_ras(mask), affine))
        written += 1
    return written, anatomy.sex


def _meta_row(case: str, index: int, sex: str, seed: int) -> list[str]:
    r = _rng(seed, index, 1)
    siemens = r.random() < 0.6
    return [case, str(int(r.integers(25, 85))), sex.lower(), "ABCDEFGH"[int(r.integers(0, 8))], "ct thorax",
            SPLIT_EVERY.get(index % 10, "train"), "siemens" if siemens else "philips",
            "somatom definition edge" if siemens else "ingenuity ct", str(int(r.choice([100, 120]))), "", ""]


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def make_synthetic_totalseg(out: str | Path, n: int, shape: tuple[int, int, int] = (32, 64, 64),
                            spacing: tuple[float, float, float] = (3.0, 1.5, 1.5), seed: int = 0,
                            progress: Callable[[int, int], None] | None = None) -> TotalSegSummary:
    """Write ``n`` synthetic TotalSegmentator cases under ``out`` (see the module docstring).

    ``shape`` is (D, H, W) = (slices, rows, columns), ``spacing`` (z, y, x) in mm; volumes are stored as (W, H, D)
    RAS. ``progress(done, n)`` is called after each case.
    """
    _check_args(n, shape, spacing, seed)
    root = Path(out)
    d, h, w = (int(s) for s in shape)
    grid = phantom.make_grid((w, h, d), (float(spacing[2]), float(spacing[1]), float(spacing[0])))
    rows, files, splits = [], 0, {}
    for i in range(int(n)):
        case = f"s{i:04d}"
        written, sex = _make_case(root, case, grid, int(seed), i)
        files += written
        rows.append(_meta_row(case, i, sex, int(seed)))
        splits[case] = rows[-1][META_COLUMNS.index("split")]
        if progress is not None:
            progress(i + 1, int(n))
    buf = io.StringIO()
    buf.write("\ufeff" + ";".join(META_COLUMNS) + "\n")
    buf.writelines(";".join(r) + "\n" for r in rows)
    atomic_write_text(root / "meta.csv", buf.getvalue())
    return TotalSegSummary(root, tuple(splits), splits, STRUCTURES, files + 1)
