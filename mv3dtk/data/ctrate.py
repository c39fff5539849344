"""CT-RATE and RadGenome-ChestCT: names, columns and file layout as distributed.

Facts come from the peers' own code (see ``shared/reference/ctclip-fvlm.md`` §1 and §4). Every
other module takes these names from here, so the synthetic generator and the readers cannot drift.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

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


def needs_rescale(stored, hu_source: str = "auto") -> bool:
    """Whether the metadata CSV's RescaleSlope/RescaleIntercept must be applied to ``stored``.

    ``raw`` (CT-RATE v1) always, ``fixed`` (v2, ``*_fixed``: already HU) never. ``auto`` looks at
    the data: a HU volume has air, so its 1st percentile is far below -500; raw stored values are
    non-negative. Applying the CSV values to a v2 volume is the double rescale of CT-CLIP#50.
    """
    import numpy as np  # here, not at the top: the labeler imports this module and stays numpy-free

    if hu_source not in ("auto", "raw", "fixed"):
        raise ValueError(f"hu_source must be auto, raw or fixed, not {hu_source!r}")
    if hu_source != "auto":
        return hu_source == "raw"
    stored = np.asarray(stored)
    step = max(1, round((stored.size / 200_000) ** (1 / stored.ndim)))
    sample = stored[(slice(None, None, step),) * stored.ndim]  # strided view, no full copy
    return float(np.percentile(sample, 1)) > -500.0
