"""Deterministic synthetic CT-RATE + RadGenome-ChestCT dataset in the real on-disk layout.

``make_synthetic_dataset(out, ...)`` writes, under ``out`` (paths from :mod:`mv3dtk.data.ctrate`)::

    dataset/{train,valid}/<split>_<pid>/<split>_<pid>_<scan>/<split>_<pid>_<scan>_<recon>.nii.gz
    dataset/radiology_text_reports/{train,validation}_reports.csv      (REPORT_COLUMNS, 1 row/volume)
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv (VolumeName + 18 labels)
    dataset/metadata/{train,validation}_metadata.csv                    (METADATA_COLUMNS)
    dataset/{train,valid}_region_mask/seg_<volume>/<region>.nii.gz      (10 RadGenome regions)
    dataset/{train,valid}_anatomy_mask/seg_<volume>/<leaf>.nii.gz       (fine anatomies, optional)
    dataset/radgenome_files/{train,validation}_region_report.csv       (Volumename, Anatomy, Sentence)
    dataset/vqa/{train,valid}_vqa.json                                  (CT-CHAT / LLaVA conversations)

``n_train`` / ``n_valid`` count *scans* (one report each). Scan ``s`` (0-based) of a split belongs to
patient ``2*(s//3)+1`` (scans ``a``, ``b``) or ``2*(s//3)+2`` (scan ``a``); every third scan
(``s % 3 == 0``) has two reconstructions ``_1`` (soft kernel) and ``_2`` (sharp kernel, more noise)
with the same anatomy, labels and report text. Region sentences use only ``_1`` volumes, as
RadGenome does; masks exist for every volume. Everything is a function of ``(seed, split, scan)``,
so adding scans never changes earlier ones, and identical arguments give byte-identical files.

**Orientation.** Volumes are NIfTI ``int16`` arrays of shape ``(W, H, D)`` (nibabel ``i, j, k`` =
columns, rows, slices), affine ``diag(-sx, -sy, sz)`` plus an origin, as dcm2niix writes axial CT,
so ``nib.aff2axcodes(affine) == ('L', 'P', 'S')``:

* ``i`` increasing -> toward the patient's LEFT (i = 0 is the patient's right side);
* ``j`` increasing -> POSTERIOR (j = 0 is anterior, the sternum side);
* ``k`` increasing -> SUPERIOR (k = 0 is the inferior end, the upper abdomen; k = D-1 the lung apices).

The heart lies left of the midline, the liver on the right, the spine posterior, the sternum anterior.
The metadata row's ``ImagePositionPatient`` is the DICOM (LPS) position of voxel (0, 0, 0), i.e.
``(-affine[0, 3], -affine[1, 3], affine[2, 3])``, and ``ImageOrientationPatient`` is ``[1, 0, 0, 0, 1, 0]``.

**HU flavours.** ``hu="fixed"`` (CT-RATE v2 / ``*_fixed``): stored values are HU (air -1000, outside
the circular field of view -1024). ``hu="raw"`` (CT-RATE v1): stored values are ``HU + 1024`` and
must be rescaled with the metadata CSV. In both cases the NIfTI header has no scaling and the CSV
says ``RescaleSlope=1``, ``RescaleIntercept=-1024`` (as the real dataset does), so applying the CSV
rescale to ``fixed`` data double-rescales it, exactly the CT-RATE pitfall.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mv3dtk.data import phantom, synth_text
from mv3dtk.data.ctrate import (ABNORMALITIES, METADATA_COLUMNS, REGION_TEXT_COLUMNS, REGIONS,
                                REPORT_COLUMNS, SPLITS, anatomy_mask_dir, labels_csv, metadata_csv, region_mask_dir,
                                region_texts_csv, reports_csv, volume_relpath, vqa_json)
from mv3dtk.data.phantom import Finding
from mv3dtk.fs import atomic_path

GZIP_LEVEL = 1  # real CT-RATE files are level ~6; 1 keeps a 300x512x512 volume fast to write
HU_FLAVOURS = ("fixed", "raw")
RAW_OFFSET = 1024  # raw = HU - RescaleIntercept

# Abnormalities cycled so each is positive in >= 1 of every 4 consecutive scans; the others are rarer.
CORE = ("Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
        "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
        "Atelectasis", "Lung nodule", "Lung opacity", "Pleural effusion", "Consolidation")
P_EXTRA = 0.12  # chance of a positive outside the cycle (every abnormality, core or not)
LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    n_volumes: dict[str, int] = field(hash=False)  # split -> number of volumes
    volume_names: tuple[str, ...] = field(repr=False)  # every volume, "<name>.nii.gz", train then valid
    files_written: int


@dataclass(frozen=True)
class _Scan:
    split: str
    index: int  # 0-based scan index in the split
    pid: int
    letter: str
    n_recon: int

    def volume(self, recon: int) -> str:
        return f"{self.split}_{self.pid}_{self.letter}_{recon}.nii.gz"


# ---------------------------------------------------------------------------------------------
# Arguments and plan
# ---------------------------------------------------------------------------------------------
def _check_args(n_train, n_valid, shape, spacing, seed, hu) -> None:
    for name, n in (("n_train", n_train), ("n_valid", n_valid)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1 (number of scans), got {n!r}")
    if len(tuple(shape)) != 3 or any(not isinstance(s, (int, np.integer)) or s < 16 for s in shape):
        raise ValueError(f"shape must be 3 integers (D, H, W), each >= 16, got {shape!r}")
    if len(tuple(spacing)) != 3 or any(not (float(s) > 0 and math.isfinite(float(s))) for s in spacing):
        raise ValueError(f"spacing must be 3 finite numbers (z, y, x) in mm, each > 0, got {spacing!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if hu not in HU_FLAVOURS:
        raise ValueError(f"hu must be one of {HU_FLAVOURS} ('fixed' = stored HU, 'raw' = HU + 1024), got {hu!r}")


def _scans(split: str, n: int) -> list[_Scan]:
    out = []
    for s in range(n):
        block, pos = divmod(s, 3)
        pid, letter = (2 * block + 1, "ab"[pos]) if pos < 2 else (2 * block + 2, "a")
        out.append(_Scan(split, s, pid, letter, 2 if pos == 0 else 1))
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def scan_labels(seed: int, split_idx: int, s: int) -> dict[str, int]:
    """Labels of scan ``s``: each CORE abnormality has one forced positive per block of 4 scans."""
    slots = _rng(seed, split_idx, 3, s // 4).integers(0, 4, size=len(CORE))
    draws = _rng(seed, split_idx, 4, s).random(len(ABNORMALITIES))
    labels = {n: int(draws[i] < P_EXTRA) for i, n in enumerate(ABNORMALITIES)}
    for n, slot in zip(CORE, slots):
        labels[n] |= int(slot == s % 4)
    if labels["Pleural effusion"] and draws[ABNORMALITIES.index("Atelectasis")] < 0.4:
        labels["Atelectasis"] = 1  # compressive atelectasis often accompanies an effusion
    return labels


def plan_findings(labels: dict[str, int], rng: np.random.Generator) -> dict[str, Finding]:
    """Side / lobe / severity of every positive abnormality (sizes are set when drawn)."""
    out = {}
    for name in ABNORMALITIES:
        if labels[name]:
            out[name] = _plan_one(name, rng)
    return out


def _plan_one(name: str, rng) -> Finding:
    side = str(rng.choice(["right", "left"]))
    severity = str(rng.choice(["minimal", "mild", "moderate"]))
    lobe = str(rng.choice(LOBES[side]))
    if name in ("Emphysema", "Mosaic attenuation pattern", "Peribronchial thickening",
                "Interlobular septal thickening", "Pleural effusion"):
        side = "both" if rng.random() < 0.4 else side
    if side == "both" and lobe == "middle":
        lobe = "lower"  # the left lung has no middle lobe
    if name == "Emphysema":
        lobe = "upper"
    elif name in ("Atelectasis", "Bronchiectasis", "Interlobular septal thickening"):
        lobe = "lower"
    elif name == "Pulmonary fibrotic sequela":
        lobe = str(rng.choice(["upper", "lower"]))
    lung_ish = name in synth_text.LUNG_REGION_ABN or name == "Pleural effusion"
    if name == "Cardiomegaly":
        severity = str(rng.choice(["mild", "moderate"]))
    return Finding(name, side if lung_ish else None, lobe if name in synth_text.LUNG_REGION_ABN else None,
                   severity=severity)


# ---------------------------------------------------------------------------------------------
# Atomic file writing
# ---------------------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through a temporary sibling renamed into place: never a torn file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def _gzip_to(fh, payload: bytes) -> None:
    """gzip with a fixed header (no file name, mtime 0), so output bytes are reproducible."""
    with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=GZIP_LEVEL) as gz:
        gz.write(payload)


def write_gz(path: Path, payload: bytes) -> None:
    _atomic(path, lambda fh: _gzip_to(fh, payload))


def gz_bytes(payload: bytes) -> bytes:
    buf = io.BytesIO()
    _gzip_to(buf, payload)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_csv(path: Path, header, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _write_text(path, buf.getvalue())


def nifti_bytes(arr: np.ndarray, affine: np.ndarray) -> bytes:
    """Uncompressed NIfTI-1 bytes: sform = qform = ``affine`` (code 1), mm units, no scaling."""
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_zooms(tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))))
    return img.to_bytes()


# ---------------------------------------------------------------------------------------------
# Geometry and metadata
# ---------------------------------------------------------------------------------------------
def _position(grid: phantom.Grid, seed: int, split_idx: int, s: int) -> tuple[float, float, float]:
    """DICOM ImagePositionPatient (LPS mm) of voxel (0, 0, 0) for scan ``s`` (shared by its recons)."""
    (w, h, _), (sx, sy, _) = grid.shape, grid.spacing
    r = _rng(seed, split_idx, 5, s)
    return (round(-(w - 1) * sx / 2, 2), round(-(h - 1) * sy / 2 + float(r.uniform(-20, 20)), 2),
            round(-float(r.uniform(100, 400)), 2))


def affine_from(grid: phantom.Grid, ipp) -> np.ndarray:  # (4, 4) RAS affine, axcodes L, P, S
    sx, sy, sz = grid.spacing
    return np.array([[-sx, 0, 0, -ipp[0]], [0, -sy, 0, -ipp[1]], [0, 0, sz, ipp[2]], [0, 0, 0, 1]], float)


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(round(v, 4))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _metadata(scan: _Scan, recon: int, grid: phantom.Grid, ipp, sex: str, seed: int) -> dict:
    (w, h, d), (sx, sy, sz) = grid.shape, grid.spacing
    pr = _rng(seed, SPLITS.index(scan.split), 6, scan.pid)
    siemens = pr.random() < 0.6
    age = int(pr.integers(25, 85)) + (scan.letter == "b")
    sr = _rng(seed, SPLITS.index(scan.split), 7, scan.index)
    kernel = phantom.KERNELS[recon - 1].name if siemens else ("B", "YC")[recon - 1]
    ma = int(sr.integers(90, 320))
    centre = [0.0, round(ipp[1] + (h - 1) * sy / 2, 2), round(ipp[2] + (d - 1) * sz / 2, 2)]
    values = {
        "VolumeName": scan.volume(recon), "Manufacturer": "SIEMENS" if siemens else "PHILIPS",
        "SeriesDescription": f"Thorax {sz:g} {kernel}" if siemens else f"CHEST {sz:g} {kernel}",
        "ManufacturerModelName": "SOMATOM Definition Edge" if siemens else "Ingenuity CT",
        "PatientSex": sex, "PatientAge": f"{age:03d}Y", "ReconstructionDiameter": float(w * sx),
        "DistanceSourceToDetector": 1085.6 if siemens else 1040.0,
        "DistanceSourceToPatient": 595.0 if siemens else 570.0, "GantryDetectorTilt": 0.0,
        "TableHeight": float(round(sr.uniform(140, 180), 1)), "RotationDirection": "CW",
        "ExposureTime": 500, "XRayTubeCurrent": ma, "Exposure": int(ma * 0.5 / 0.6),
        "FilterType": "FLAT" if siemens else "B", "GeneratorPower": int(ma * 120 / 1000) + 1,
        "FocalSpots": 1.2, "ConvolutionKernel": kernel, "PatientPosition": "HFS",
        "RevolutionTime": 0.5, "SingleCollimationWidth": 0.6, "TotalCollimationWidth": 38.4,
        "TableSpeed": 46.0, "TableFeedPerRotation": 23.0, "SpiralPitchFactor": 0.6,
        "DataCollectionCenterPatient": centre, "ReconstructionTargetCenterPatient": centre,
        "ExposureModulationType": "XYZ_EC" if siemens else "NONE",
        "CTDIvol": float(round(ma * 0.03, 2)), "ImagePositionPatient": list(ipp),
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "SliceLocation": ipp[2], "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2", "Rows": h, "Columns": w, "XYSpacing": [sy, sx],
        "RescaleIntercept": -RAW_OFFSET, "RescaleSlope": 1, "RescaleType": "HU", "NumberofSlices": d,
        "ZSpacing": float(sz), "StudyDate": f"{2019 + scan.pid % 3}{int(sr.integers(1, 13)):02d}"
                                             f"{int(sr.integers(1, 29)):02d}",
    }
    return {k: _fmt(values[k]) for k in METADATA_COLUMNS}


# ---------------------------------------------------------------------------------------------
# One scan
# ---------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    reports: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    metadata: list = field(default_factory=list)
    regions: list = field(default_factory=list)
    vqa: list = field(default_factory=list)


def _mask_folders(scan: _Scan, fine: bool):  # -> [(folder under dataset root, {stem: labels})]
    out = [(region_mask_dir(scan.split), {r: phantom.REGION_LABELS[r] for r in REGIONS})]
    if fine:
        out.append((anatomy_mask_dir(scan.split), phantom.FINE_LABELS))
    return out


def _write_masks(root: Path, scan: _Scan, lab: np.ndarray, affine, fine: bool) -> int:
    """Binary uint8 NIfTI per region (and fine anatomy), for every reconstruction of the scan."""
    written = 0
    for folder, table in _mask_folders(scan, fine):
        for stem, labels in table.items():
            lut = np.zeros(256, np.uint8)
            lut[list(labels)] = 1
            data = gz_bytes(nifti_bytes(phantom.apply_lut(lut, lab), affine))  # (W, H, D) {0, 1}
            for recon in range(1, scan.n_recon + 1):
                seg = "seg_" + scan.volume(recon)[: -len(".nii.gz")]
                _write_bytes(root / folder / seg / f"{stem}.nii.gz", data)
                written += 1
    return written


def _stored(hu: np.ndarray, flavour: str) -> np.ndarray:  # (W, H, D) float32 HU -> int16
    np.rint(hu, out=hu)
    if flavour == "raw":
        hu += RAW_OFFSET
    return hu.astype(np.int16)  # keeps the Fortran layout: no reordering when written


def _make_scan(root: Path, scan: _Scan, grid: phantom.Grid, opts: dict, rows: _Rows) -> int:
    seed, si = opts["seed"], SPLITS.index(scan.split)
    anatomy = phantom.sample_anatomy(_rng(seed, si, 0, scan.pid))
    labels = scan_labels(seed, si, scan.index)
    plan_rng, draw_rng, text_rng = (np.random.default_rng(c) for c in
                                    np.random.SeedSequence([seed, si, 1, scan.index]).spawn(3))
    canvas, found = phantom.draw_labels(grid, anatomy, plan_findings(labels, plan_rng), draw_rng)
    found = phantom.draw_hu(canvas, found, draw_rng)
    report = synth_text.make_report(labels, found, grid.spacing[2], text_rng)
    ipp = _position(grid, seed, si, scan.index)
    affine = affine_from(grid, ipp)
    written = _write_masks(root, scan, canvas.lab, affine, opts["fine_anatomies"])
    for recon in range(1, scan.n_recon + 1):
        volume = scan.volume(recon)
        hu = phantom.render(canvas.hu, phantom.KERNELS[recon - 1], _rng(seed, si, 2, scan.index, recon))
        write_gz(root / volume_relpath(volume), nifti_bytes(_stored(hu, opts["hu"]), affine))
        del hu
        written += 1
        _add_rows(rows, scan, volume, recon, labels, found, report, grid, ipp, anatomy.sex, seed, text_rng)
        opts["tick"]()
    return written


def _add_rows(rows: _Rows, scan, volume, recon, labels, found, report, grid, ipp, sex, seed, rng) -> None:
    rows.reports.append([volume, report.clinical, report.technique, report.findings, report.impressions])
    rows.labels.append([volume] + [labels[n] for n in ABNORMALITIES])
    meta = _metadata(scan, recon, grid, ipp, sex, seed)
    rows.metadata.append([meta[c] for c in METADATA_COLUMNS])
    if recon == 1:
        rows.regions.extend(synth_text.region_rows(volume, report))
    rows.vqa.extend(synth_text.vqa_items(volume, labels, report, found, rng))


def _write_tables(root: Path, split: str, rows: _Rows) -> int:
    _write_csv(root / reports_csv(split), REPORT_COLUMNS, rows.reports)
    _write_csv(root / labels_csv(split), ("VolumeName",) + ABNORMALITIES, rows.labels)
    _write_csv(root / metadata_csv(split), METADATA_COLUMNS, rows.metadata)
    _write_csv(root / region_texts_csv(split), REGION_TEXT_COLUMNS, rows.regions)
    _write_text(root / vqa_json(split), json.dumps(rows.vqa, indent=1, ensure_ascii=False) + "\n")
    return 5


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def make_synthetic_dataset(out: str | Path, *, n_train: int = 8, n_valid: int = 4,
                           shape: tuple[int, int, int] = (64, 128, 128),
                           spacing: tuple[float, float, float] = (3.0, 0.75, 0.75), seed: int = 0,
                           hu: str = "fixed", fine_anatomies: bool = True,
                           progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Write a synthetic CT-RATE/RadGenome dataset under ``out`` (see the module docstring).

    ``shape`` is (D, H, W) = (slices, rows, columns) and ``spacing`` (z, y, x) in mm; volumes are
    stored as (W, H, D). ``progress(done, total)`` is called after each volume.
    """
    _check_args(n_train, n_valid, shape, spacing, seed, hu)
    root = Path(out)
    d, h, w = (int(s) for s in shape)
    grid = phantom.make_grid((w, h, d), (float(spacing[2]), float(spacing[1]), float(spacing[0])))
    plans = {"train": _scans("train", n_train), "valid": _scans("valid", n_valid)}
    total = sum(s.n_recon for scans in plans.values() for s in scans)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    opts = {"seed": int(seed), "hu": hu, "fine_anatomies": fine_anatomies, "tick": tick}
    files, names = 0, []
    for split, scans in plans.items():
        rows = _Rows()
        for scan in scans:
            files += _make_scan(root, scan, grid, opts, rows)
        files += _write_tables(root, split, rows)
        names += [r[0] for r in rows.labels]
    counts = {split: sum(s.n_recon for s in scans) for split, scans in plans.items()}
    return SynthSummary(root, counts, tuple(names), files)
