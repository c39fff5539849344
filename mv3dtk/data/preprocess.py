"""CT preprocessing: read NIfTI fast, reorient, resample, window HU, centre crop / pad.

Convention of every array mv3d writes (``prep/volumes/*.npy``, ``prep/masks/*.npy``):
shape ``(D, H, W)`` with **D inferior -> superior, H anterior -> posterior, W patient right ->
left** (nibabel axis codes ``S, P, L``), i.e. axial slices in radiological display order, viewed
from the feet, the first slice at the bottom of the scan.

Speed (see ``benchmarks/prep.py``): gzip is decoded with ISA-L (``isal.igzip``, about 2x zlib) and
the voxels are a view on the decoded bytes;
reorientation is a view; resampling is separable linear interpolation evaluated *only* for the
output voxels that survive the centre crop, slices first, so an int16 volume is converted to float
only after it has been reduced to the slices that are needed. The sampling grid is the one of
``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)`` with ``size`` given
(half-voxel centres; CT-CLIP's loader), and masks use nearest-exact on the same grid, so image and
mask stay aligned. ``grid="monai"`` samples MONAI ``Spacingd``'s grid instead (first voxel centre
kept), for comparison with MONAI-preprocessed data.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DataError

try:
    from isal import igzip  # ISA-L gzip, about 2x zlib
except ImportError:  # pragma: no cover - isal is a dependency; gzip is the fallback
    igzip = None

AXCODES = ("S", "P", "L")  # what (D, H, W) index increase points toward
_STORED_TARGET = ("L", "P", "S")  # the same, in nibabel's (i, j, k) order before the transpose


@dataclass(frozen=True)
class Oriented:
    """A volume in (D, H, W) convention (a view on the decoded data) and its voxel size."""

    array: np.ndarray  # (D, H, W), stored dtype
    spacing: tuple[float, float, float]  # (d, h, w) mm
    source_axcodes: tuple[str, str, str]
    affine: np.ndarray  # source affine (4, 4)


def _decompress(raw: bytes, path: Path) -> bytes:
    try:
        if igzip is not None:
            return igzip.decompress(raw)
    except Exception as e:  # isal raises its own error types for corrupt data
        raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e}); the file is truncated or corrupt, "
                        "download it again") from e
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt, download it again") from e


def read_nifti(path: str | Path):
    """Load a ``.nii`` / ``.nii.gz`` entirely into memory (``nibabel.Nifti1Image``)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if raw[:2] == b"\x1f\x8b":
        raw = _decompress(raw, path)
    try:
        img = nib.Nifti1Image.from_bytes(raw)
        proxy = img.dataobj
        offset = int(proxy.offset)  # where the voxels start (the header's vox_offset may say 0)
    except Exception as e:
        raise DataError(f"{path}: not a readable NIfTI-1 image ({type(e).__name__}: {e})") from e
    count = int(np.prod(img.shape))
    expected = count * img.get_data_dtype().itemsize + offset
    if len(raw) < expected:
        raise DataError(f"{path}: the image data is truncated ({len(raw)} of {expected} bytes); download it again")
    if proxy.slope == 1.0 and proxy.inter == 0.0:  # no scl_* scaling: a read-only view on the bytes, no copy
        view = np.frombuffer(raw, img.get_data_dtype(), count=count, offset=offset)
        img = nib.Nifti1Image(view.reshape(img.shape, order="F"), img.affine, img.header)  # (i, j, k)
    return img


def voxel_data(img, path: str | Path = "") -> np.ndarray:
    """The stored voxels (NIfTI ``scl_slope``/``scl_inter`` applied if set), 3-D, finite."""
    arr = np.asanyarray(img.dataobj)  # (i, j, k), Fortran order
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {arr.shape}; pass one 3-D series per file")
    if min(arr.shape) < 2:
        raise DataError(f"{path}: a {arr.shape} image is 2-D; pass a 3-D CT volume")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: contains NaN or infinite voxels; fix or drop this volume")
    return arr


def orient(arr: np.ndarray, affine: np.ndarray) -> Oriented:
    """Reorder/flip ``(i, j, k)`` stored voxels into the (D, H, W) convention (no copy)."""
    ornt = nib.orientations.io_orientation(affine)
    tf = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(_STORED_TARGET))
    view = nib.orientations.apply_orientation(arr, tf)  # (L, P, S) -> i, j, k
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(tf):
        spacing[int(dst_axis)] = float(zooms[src_axis])
    return Oriented(view.transpose(2, 1, 0), (spacing[2], spacing[1], spacing[0]),
                    tuple(nib.aff2axcodes(affine)), np.asarray(affine))


@dataclass(frozen=True)
class AxisPlan:
    """Where the ``n_out`` output samples of one axis come from: for the valid outputs
    ``out[lo:hi]``, source indices ``i0``/``i1`` and linear weight ``w`` (nearest: ``near``)."""

    n_out: int
    lo: int
    hi: int
    i0: np.ndarray
    i1: np.ndarray
    w: np.ndarray
    near: np.ndarray
    n_resampled: int


GRIDS = ("ctclip", "monai")


def plan_axis(n_in: int, s_in: float, s_out: float, n_out: int, grid: str = "ctclip") -> AxisPlan:
    """Resample ``n_in`` voxels of size ``s_in`` to size ``s_out``, then centre crop or pad to
    ``n_out``. Two sampling grids:

    * ``ctclip`` (default): ``F.interpolate(size=round(n_in*s_in/s_out), align_corners=False)``,
      half-voxel centres, so the resampled field of view is centred on the source's (CT-CLIP's
      loader); crop start ``(n - n_out)//2``, pad before ``(n_out - n)//2``.
    * ``monai``: MONAI ``Spacingd`` + ``ResizeWithPadOrCropd``: the first voxel centre is kept,
      ``round((n_in-1)*s_in/s_out + 1)`` samples; crop start ``n//2 - n_out//2``.
    """
    if grid == "monai":
        n_res = max(1, int(round((n_in - 1) * s_in / s_out + 1)))  # round half to even, as MONAI
        offset = n_res // 2 - n_out // 2 if n_res >= n_out else -((n_out - n_res) // 2)
    elif grid == "ctclip":
        n_res = max(1, int(round(n_in * s_in / s_out)))
        offset = (n_res - n_out) // 2 if n_res >= n_out else -((n_out - n_res) // 2)
    else:
        raise ValueError(f"grid must be one of {GRIDS}, not {grid!r}")
    r = np.arange(n_out) + offset  # index on the resampled axis of each output sample
    valid = np.flatnonzero((r >= 0) & (r < n_res))
    lo, hi = (int(valid[0]), int(valid[-1]) + 1) if valid.size else (0, 0)
    r = r[lo:hi]
    centre = r * (s_out / s_in) if grid == "monai" else (r + 0.5) * (n_in / n_res) - 0.5  # source coordinate
    src = np.clip(centre, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    near = np.clip(np.floor(centre + 0.5), 0, n_in - 1).astype(np.int64)
    return AxisPlan(n_out, lo, hi, i0, i1, (src - i0).astype(np.float32), near, n_res)


def _lerp(x: np.ndarray, p: AxisPlan, axis: int) -> np.ndarray:
    if axis == 0:  # slab by slab: no full-size gathers of the (int16) source, no float32 temporaries
        out = np.empty((len(p.i0),) + x.shape[1:], np.float32)  # (n, H, W)
        tmp = np.empty(x.shape[1:], np.float32)
        for k, (i0, i1, w) in enumerate(zip(p.i0, p.i1, p.w)):
            out[k] = x[i0]
            if w:
                np.subtract(x[i1], x[i0], out=tmp, dtype=np.float32)
                tmp *= w
                out[k] += tmp
        return out
    shape = [1, 1, 1]
    shape[axis] = -1
    w = p.w.reshape(shape)
    a = np.take(x, p.i0, axis=axis).astype(np.float32, copy=False)
    b = np.take(x, p.i1, axis=axis).astype(np.float32, copy=False)
    b -= a
    b *= w
    a += b
    return a


def resample_linear(arr: np.ndarray, plans: tuple[AxisPlan, AxisPlan, AxisPlan], fill: float) -> np.ndarray:
    """(D, H, W) any dtype -> (n_out...) float32, trilinear, only where the crop keeps samples."""
    order = sorted(range(3), key=lambda a: plans[a].n_resampled / arr.shape[a])  # shrink most first
    x = arr
    for axis in order:
        x = _lerp(x, plans[axis], axis)  # (..., hi-lo on this axis, ...)
    out = np.full([p.n_out for p in plans], fill, np.float32)
    out[plans[0].lo:plans[0].hi, plans[1].lo:plans[1].hi, plans[2].lo:plans[2].hi] = x
    return out


def resample_nearest(arr: np.ndarray, plans: tuple[AxisPlan, AxisPlan, AxisPlan], fill: int = 0) -> np.ndarray:
    """(D, H, W) labels/bitmask -> (n_out...) same dtype, nearest-exact on the same grid."""
    x = arr[plans[0].near][:, plans[1].near][:, :, plans[2].near]
    out = np.full([p.n_out for p in plans], fill, arr.dtype)
    out[plans[0].lo:plans[0].hi, plans[1].lo:plans[1].hi, plans[2].lo:plans[2].hi] = x
    return out


def window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """HU -> [-1, 1] over [lo, hi] (in place on float32)."""
    np.clip(x, lo, hi, out=x)
    x -= (lo + hi) / 2
    x *= 2.0 / (hi - lo)
    return x


def plans_for(shape: tuple[int, int, int], spacing, target_spacing, target_size,
              grid: str = "ctclip") -> tuple[AxisPlan, ...]:
    return tuple(plan_axis(n, s, t, o, grid) for n, s, t, o in zip(shape, spacing, target_spacing, target_size))


def preprocess_image(oriented: Oriented, *, spacing, target_spacing, target_size, hu_window,
                     rescale: tuple[float, float] | None, grid: str = "ctclip") -> np.ndarray:
    """Oriented stored voxels -> float16 (D, H, W) in [-1, 1] (``rescale`` = slope, intercept)."""
    plans = plans_for(oriented.array.shape, spacing, target_spacing, target_size, grid)
    x = resample_linear(oriented.array, plans, fill=math.nan)  # (D, H, W) float32, NaN = padding
    if rescale is not None:
        x *= rescale[0]
        x += rescale[1]
    pad = np.isnan(x)
    x = window(x, *hu_window)
    x[pad] = -1.0  # air
    return x.astype(np.float16)
