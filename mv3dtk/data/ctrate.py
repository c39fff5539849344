"""CT-RATE and RadGenome-ChestCT: names, columns and file layout as distributed.

Facts come from the peers' own code (see ``shared/reference/ctclip-fvlm.md`` §1 and §4). Every
other module takes these names from here, so the synthetic generator and the readers cannot drift.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import NamedTuple

# The 18 CT-RATE abnormality columns, in the order of the labels CSV (CT-CLIP relies on this order).
ABNORMALITIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

# RadGenome-ChestCT top-level regions (mask file stems), "trachea and bronchie" sic.
REGIONS: tuple[str, ...] = (
    "abdomen",
    "bone",
    "breast",
    "esophagus",
    "heart",
    "lung",
    "mediastinum",
    "pleura",
    "thyroid",
    "trachea and bronchie",
)

REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)

METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex",
    "PatientAge", "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient",
    "GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent",
    "Exposure", "FilterType", "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition",
    "RevolutionTime", "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed",
    "TableFeedPerRotation", "SpiralPitchFactor", "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
    "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberofSlices",
    "ZSpacing", "StudyDate",
)

REGION_TEXT_COLUMNS: tuple[str, ...] = ("Volumename", "Anatomy", "Sentence")  # lowercase "n", sic

NOT_GIVEN = "Not given."  # what CT-RATE writes where a report section is absent

SPLITS: tuple[str, ...] = ("train", "valid")

SPLIT_FILE_NAMES = {  # split -> the word CT-RATE uses in its CSV names
    "train": "train",
    "valid": "validation",
}

_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")


def parse_volume_name(name: str) -> tuple[str, str, str, str]:
    """``"valid_53_a_1(.nii.gz)"`` -> ``("valid", "53", "a", "1")`` (split, patient, scan, recon)."""
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name
    m = _NAME.match(stem)
    if m is None:
        raise ValueError(
            f"{name!r} is not a CT-RATE volume name; expected <split>_<patient>_<scan>_<recon>, "
            "e.g. 'train_1_a_1.nii.gz'"
        )
    return m.group(1), m.group(2), m.group(3), m.group(4)


def volume_relpath(name: str, folder: str | None = None) -> Path:
    """Relative path of a volume under the dataset root, e.g.
    ``dataset/train/train_1/train_1_a/train_1_a_1.nii.gz`` (``folder`` overrides ``train``, e.g.
    ``train_fixed``)."""
    split, pid, scan, recon = parse_volume_name(name)
    stem = f"{split}_{pid}_{scan}_{recon}"
    return Path("dataset", folder or split, f"{split}_{pid}", f"{split}_{pid}_{scan}", stem + ".nii.gz")


def reports_csv(split: str) -> Path:
    return Path("dataset", "radiology_text_reports", f"{SPLIT_FILE_NAMES[split]}_reports.csv")


def metadata_csv(split: str) -> Path:
    return Path("dataset", "metadata", f"{SPLIT_FILE_NAMES[split]}_metadata.csv")


def labels_csv(split: str) -> Path:
    return Path("dataset", "multi_abnormality_labels", f"{split}_predicted_labels.csv")


def region_mask_dir(split: str) -> Path:
    """Root of RadGenome's per-volume region mask folders ``seg_<volume>/<region>.nii.gz``."""
    return Path("dataset", f"{split}_region_mask")


def anatomy_mask_dir(split: str) -> Path:
    """Root of RadGenome's fine-anatomy mask folders ``seg_<volume>/<leaf>.nii.gz``."""
    return Path("dataset", f"{split}_anatomy_mask")


def region_texts_csv(split: str) -> Path:
    return Path("dataset", "radgenome_files", f"{SPLIT_FILE_NAMES[split]}_region_report.csv")


def vqa_json(split: str) -> Path:
    return Path("dataset", "vqa", f"{split}_vqa.json")


# -- reading ---------------------------------------------------------------------------------

def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a CT-RATE CSV as dicts (stdlib only; fine for the 50k-row CT-RATE tables)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def find_split_folder(root: str | Path, split: str) -> Path | None:
    """The folder holding a split's volumes: ``dataset/<split>_fixed`` (CT-RATE v2) if present,
    else ``dataset/<split>``."""
    for name in (f"{split}_fixed", split):
        p = Path(root, "dataset", name)
        if p.is_dir():
            return p
    return None


RAW_TISSUE = (824.0, 1224.0)  # fat .. soft tissue (HU -200 .. 200) as a raw volume stores them (HU + 1024)


class HuGuess(NamedTuple):
    """What the voxels say about their units: ``raw`` (HU + 1024, the CSV rescale is needed) or HU,
    whether the evidence is ``sure``, and ``why`` in words (for the per-volume warning)."""

    raw: bool
    sure: bool
    why: str


def guess_hu(stored) -> HuGuess:
    """Raw-stored (HU + 1024) or HU? Decided from the voxels alone.

    A constant fill at the bottom of the range (padding outside the field of view: 0, -1024 or
    -2000 in raw units; -1024, -3024 in HU) says nothing about the units and is set aside first.
    Then a raw volume has no negative value (its air is about +24), while an HU volume has air
    (-1000) or fat (-100): a 1st percentile below -50 means HU. Without either (a tight crop of
    soft tissue), a raw volume still holds its soft tissue at 824..1224 (HU -200..200); if a tenth of
    the voxels lie there it is raw, else HU, and that last call is not sure.
    """
    import numpy as np  # here, not at the top: the labeler imports this module and stays numpy-free

    stored = np.asarray(stored)
    step = max(1, round((stored.size / 200_000) ** (1 / stored.ndim)))
    sample = stored[(slice(None, None, step),) * stored.ndim].ravel()  # strided view, small copy
    lo = sample.min()
    body = sample[sample != lo]
    pad = 1.0 - body.size / sample.size
    if body.size == 0:
        body = sample
    pad_note = f"; a fill of {lo:g} in {pad:.0%} of the voxels set aside" if pad >= 0.01 else ""
    p1 = float(np.percentile(body, 1))
    if p1 < -50.0:
        return HuGuess(False, True, f"1st percentile {p1:.0f}: air or fat in HU{pad_note}")
    tissue = float(np.mean((body >= RAW_TISSUE[0]) & (body <= RAW_TISSUE[1])))
    if tissue >= 0.1:
        return HuGuess(True, True, f"nothing below -50 and {tissue:.0%} of the voxels at raw soft-tissue values "
                                   f"824..1224{pad_note}")
    return HuGuess(False, False, f"neither air nor fat, 1st percentile {p1:.0f}, and only {tissue:.0%} of the "
                                 f"voxels at raw soft-tissue values 824..1224{pad_note}")


def needs_rescale(stored, hu_source: str = "auto") -> bool:
    """Whether the metadata CSV's RescaleSlope/RescaleIntercept must be applied to ``stored``.

    ``raw`` (CT-RATE v1) always, ``fixed`` (v2, ``*_fixed``: already HU) never, ``auto`` as
    :func:`guess_hu` reads the voxels. Applying the CSV values to a v2 volume is the double rescale
    of CT-CLIP#50.
    """
    if hu_source not in ("auto", "raw", "fixed"):
        raise ValueError(f"hu_source must be auto, raw or fixed, not {hu_source!r}")
    if hu_source != "auto":
        return hu_source == "raw"
    return guess_hu(stored).raw


def hu_warnings(path, guess: HuGuess, rescale: tuple[float, float] | None, hu_source: str, known_hu: bool = False,
                header_scaling: tuple[float | None, float | None] = (None, None)) -> list[str]:
    """What one volume's HU decision leaves in doubt, as warning lines for ``prep/volumes.parquet``:
    a ``rescale`` (slope, intercept) applied to voxels that look like HU already, or on top of the
    NIfTI header's own ``header_scaling`` (the double rescale of CT-CLIP#50); HU kept for voxels
    that look raw (``--hu-source fixed``, or a folder ``known_hu``: ``*_fixed``, RadGenome); an
    ``auto`` call made on weak evidence. ``guess``: :func:`guess_hu` of the voxels as read (header scaling
    applied), computed once per volume by the caller."""
    how = f"--hu-source {hu_source}" + (" (a *_fixed or RadGenome folder: known HU)" if known_hu else "")
    out = []
    if rescale is not None and not guess.raw:
        out.append(f"{path}: {how} applied the rescale (slope {rescale[0]:g}, intercept {rescale[1]:g}) to voxels "
                   f"that look like HU already ({guess.why}): a double rescale (CT-CLIP#50) if they are; check the "
                   "volume and use --hu-source auto or fixed")
    if rescale is None and guess.raw:  # --hu-source fixed, or auto on a folder known to hold HU
        out.append(f"{path}: {how} kept the voxels as HU, but they look raw (HU + 1024: {guess.why}); if they are, "
                   "use --hu-source raw")
    slope, inter = (1.0 if header_scaling[0] is None else header_scaling[0],
                    0.0 if header_scaling[1] is None else header_scaling[1])
    if rescale is not None and (slope, inter) != (1.0, 0.0):
        out.append(f"{path}: the NIfTI header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) was applied, and "
                   f"the rescale (slope {rescale[0]:g}, intercept {rescale[1]:g}) on top of it: a double rescale "
                   "(CT-CLIP#50) if the header already gave HU; use --hu-source fixed for such files")
    if hu_source == "auto" and not known_hu and not guess.sure:
        out.append(f"{path}: HU taken as stored from weak evidence ({guess.why}); if the volume stores HU + 1024, "
                   "use --hu-source raw")
    return out
