"""Readers that turn a dataset on disk into a list of :class:`SourceVolume` for ``mv3d prep``.

Three layouts (``--layout auto`` picks one, see :func:`detect_layout`):

* ``ctrate``: CT-RATE as distributed (``dataset/{train,valid}[_fixed]/...``, reports / labels /
  metadata CSVs joined on ``VolumeName``), plus RadGenome region masks
  (``dataset/<split>_region_mask/seg_<volume>/<region>.nii.gz``) and region sentences when present.
* ``radgenome``: RadGenome-ChestCT (``dataset/<split>_preprocessed/train_1/train_1a/train_1_a_1.nii.gz``,
  voxels already HU, the whole report = the region-sentence row with an empty ``Anatomy``).
* ``csv``: one CSV or parquet file for your own data: ``image`` (path, relative to the file's
  folder or absolute), optional ``volume_id``, ``split``, ``patient_id``, ``report`` or
  ``findings``/``impressions``, any of the 18 CT-RATE label columns, ``mask_dir`` (a folder of
  ``<region>.nii.gz`` masks), ``spacing_z/spacing_y/spacing_x`` and ``rescale_slope/intercept``.

Problems that concern one volume (no report row, a report row without a volume, ...) are kept as
``SourceVolume.error`` so that prep records them per volume and goes on with the others.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ..errors import DataError
from . import ctrate

LAYOUTS = ("ctrate", "radgenome", "csv")


@dataclass
class SourceVolume:
    volume_id: str
    split: str
    patient_id: str | None = None
    scan_id: str | None = None
    image_path: Path | None = None
    findings: str | None = None
    impressions: str | None = None
    labels: dict[str, int | None] = field(default_factory=dict)
    spacing: tuple[float, float, float] | None = None  # (z, y, x) mm from metadata; None: header
    rescale: tuple[float, float] | None = None  # (slope, intercept) from metadata
    hu_hint: str | None = None  # "fixed" where the source is known to be HU already
    masks: dict[str, tuple[Path, ...]] = field(default_factory=dict)  # region -> mask file(s), united
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class RegionText:
    volume_id: str
    region: str | None  # first path component (a RadGenome region); None = whole report
    anatomy: str | None
    sentence: str


@dataclass
class Source:
    layout: str
    root: Path
    volumes: list[SourceVolume]
    region_texts: list[RegionText]
    regions: tuple[str, ...] = ctrate.REGIONS
    warnings: list[str] = field(default_factory=list)


# -- detection -------------------------------------------------------------------------------

def detect_layout(source: Path) -> str:
    if source.is_file():
        return "csv"
    ds = source / "dataset"
    if any(ds.glob("*_preprocessed")):
        return "radgenome"
    if (ds / "radiology_text_reports").is_dir() or any((ds / s).is_dir() for s in ctrate.SPLITS):
        return "ctrate"
    raise DataError(
        f"{source}: cannot tell the dataset layout; expected a CT-RATE folder (holding "
        "dataset/radiology_text_reports/ and dataset/train/ or dataset/valid/), a RadGenome folder "
        "(dataset/train_preprocessed/ ...) or a CSV/parquet file; pass --layout to choose"
    )


def dataset_root(source: str | Path) -> Path:
    """Accept the dataset root or its ``dataset/`` subfolder."""
    p = Path(source).expanduser().resolve()
    if not p.exists():
        raise DataError(f"{p} does not exist; pass the folder that holds dataset/ (or a CSV/parquet file)")
    if p.is_dir() and p.name == "dataset" and not (p / "dataset").exists():
        return p.parent
    return p


def read_source(source: str | Path, *, layout: str = "auto", splits=ctrate.SPLITS, masks: str | Path | None = None,
                region_texts: str | Path | None = None) -> Source:
    root = dataset_root(source)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; use one of auto, {', '.join(LAYOUTS)}")
    reader = {"ctrate": read_ctrate, "radgenome": read_radgenome, "csv": read_table}[layout]
    src = reader(root, splits=tuple(splits), masks=Path(masks) if masks else None)
    if region_texts:
        src.region_texts = read_region_texts(Path(region_texts))
    if layout != "csv":
        add_anatomy_fallback(src)
    src.volumes.sort(key=lambda v: v.volume_id)
    return src


# -- shared helpers --------------------------------------------------------------------------

def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    return None if not value or value == ctrate.NOT_GIVEN else value


def _stem(name: str) -> str:
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")


def _labels(row: dict | None, present: list[str]) -> dict[str, int | None]:
    if row is None:
        return {c: None for c in ctrate.ABNORMALITIES}
    out = {}
    for c in ctrate.ABNORMALITIES:
        v = row.get(c) if c in present else None
        out[c] = None if v in (None, "") else int(float(v))
    return out


def _spacing_from_metadata(row: dict | None) -> tuple[float, float, float] | None:
    if not row or not row.get("XYSpacing") or not row.get("ZSpacing"):
        return None
    xy = ast.literal_eval(row["XYSpacing"])  # "[0.75, 0.75]" (fVLM parses it the same way)
    return float(row["ZSpacing"]), float(xy[1]), float(xy[0])


def _rescale_from_metadata(row: dict | None) -> tuple[float, float] | None:
    if not row or row.get("RescaleSlope") in (None, "") or row.get("RescaleIntercept") in (None, ""):
        return None
    return float(row["RescaleSlope"]), float(row["RescaleIntercept"])


def _masks_for(mask_root: Path | None, volume_id: str, regions) -> dict[str, tuple[Path, ...]]:
    if mask_root is None:
        return {}
    folder = mask_root / f"seg_{volume_id}"
    return {r: (folder / f"{r}.nii.gz",) for r in regions if (folder / f"{r}.nii.gz").is_file()}


def add_anatomy_fallback(src: "Source") -> None:
    """Where a volume has no mask file for a region, unite the RadGenome fine-anatomy masks of
    that region named by its region sentences (``lung/lung/right lung`` -> ``right lung.nii.gz``
    under ``dataset/<split>_anatomy_mask/seg_<volume>/``)."""
    leaves: dict[tuple[str, str], set[str]] = {}
    for t in src.region_texts:
        if t.anatomy and "/" in t.anatomy:
            leaves.setdefault((t.volume_id, t.region), set()).add(t.anatomy.rsplit("/", 1)[1])
    for v in src.volumes:
        folder = src.root / ctrate.anatomy_mask_dir(v.split) / f"seg_{v.volume_id}"
        for region in src.regions:
            if region in v.masks or not folder.is_dir():
                continue
            files = tuple(folder / f"{leaf}.nii.gz" for leaf in sorted(leaves.get((v.volume_id, region), ())))
            files = tuple(f for f in files if f.is_file())
            if files:
                v.masks[region] = files


def read_region_texts(path: Path) -> list[RegionText]:
    """RadGenome ``*_region_report.csv`` (``Volumename, Anatomy, Sentence``)."""
    if not path.is_file():
        raise DataError(f"{path}: region-sentence CSV not found")
    rows = ctrate.read_csv_rows(path)
    if rows and not {"Volumename", "Anatomy", "Sentence"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns Volumename, Anatomy, Sentence; found {list(rows[0])}")
    out = []
    for r in rows:
        anatomy = (r["Anatomy"] or "").strip() or None
        sentence = (r["Sentence"] or "").strip()
        if sentence:
            out.append(RegionText(_stem(r["Volumename"]), anatomy.split("/")[0] if anatomy else None, anatomy, sentence))
    return out


def _read_labels(root: Path, split: str, warnings: list[str]) -> tuple[dict[str, dict], list[str]]:
    path = root / ctrate.labels_csv(split)
    if not path.is_file():
        warnings.append(f"{path} not found: the {split} labels are left empty")
        return {}, []
    rows = ctrate.read_csv_rows(path)
    header = list(rows[0]) if rows else []
    missing = [c for c in ctrate.ABNORMALITIES if c not in header]
    if missing:
        warnings.append(f"{path} lacks the label columns {missing}; they are left empty (null) for every volume")
    return {_stem(r["VolumeName"]): r for r in rows}, [c for c in ctrate.ABNORMALITIES if c in header]


def _read_metadata(root: Path, split: str) -> dict[str, dict]:
    path = root / ctrate.metadata_csv(split)
    return {_stem(r["VolumeName"]): r for r in ctrate.read_csv_rows(path)} if path.is_file() else {}


# -- CT-RATE ---------------------------------------------------------------------------------

def _ctrate_split(root: Path, split: str, masks: Path | None, warnings: list[str]) -> list[SourceVolume]:
    folder = ctrate.find_split_folder(root, split)
    reports_path = root / ctrate.reports_csv(split)
    if folder is None and not reports_path.is_file():
        return []
    files = {_stem(p.name): p for p in sorted(folder.glob("*/*/*.nii.gz"))} if folder else {}
    reports = {}
    if reports_path.is_file():
        reports = {_stem(r["VolumeName"]): r for r in ctrate.read_csv_rows(reports_path)}
    else:
        warnings.append(f"{reports_path} not found: every {split} volume lacks a report")
    labels, present = _read_labels(root, split, warnings)
    meta = _read_metadata(root, split)
    mask_root = masks or (root / ctrate.region_mask_dir(split))
    mask_root = mask_root if mask_root.is_dir() else None
    hint = "fixed" if folder is not None and folder.name.endswith("_fixed") else None
    out = []
    for vid in sorted(set(files) | set(reports)):
        rep, path = reports.get(vid), files.get(vid)
        try:
            _, pid, scan, _ = ctrate.parse_volume_name(vid)
        except ValueError:
            pid = scan = None
        v = SourceVolume(vid, split, pid, scan, path, _text(rep and rep.get("Findings_EN")),
                         _text(rep and rep.get("Impressions_EN")), _labels(labels.get(vid), present),
                         _spacing_from_metadata(meta.get(vid)), _rescale_from_metadata(meta.get(vid)), hint,
                         _masks_for(mask_root, vid, ctrate.REGIONS))
        if path is None:
            v.error = f"{reports_path} has a report row for {vid} but no volume file was found under {folder or root}"
        elif rep is None:
            v.error = f"{path}: no report row for {vid} in {reports_path}"
        elif v.findings is None and v.impressions is None:
            v.error = (f"{reports_path}: the report of {vid} is empty (Findings_EN and Impressions_EN); fill the row "
                       "or drop the volume")
        elif labels and vid not in labels:
            v.warnings.append(f"no row for {vid} in {root / ctrate.labels_csv(split)}: labels left empty")
        out.append(v)
    return out


def read_ctrate(root: Path, *, splits, masks: Path | None = None) -> Source:
    warnings: list[str] = []
    volumes = [v for s in splits for v in _ctrate_split(root, s, masks, warnings)]
    if not volumes:
        raise DataError(f"{root}: no CT-RATE volumes or reports found for the splits {list(splits)}")
    texts = []
    for s in splits:
        path = root / ctrate.region_texts_csv(s)
        if path.is_file():
            texts += read_region_texts(path)
    return Source("ctrate", root, volumes, texts, warnings=warnings)


# -- RadGenome -------------------------------------------------------------------------------

_RG_FOLDER = re.compile(r"^(train|valid)_(\d+)([a-z]+)$")  # scan folder "train_1000a", no underscore


def _whole_reports(texts: list[RegionText]) -> dict[str, str]:
    return {t.volume_id: t.sentence for t in texts if t.anatomy is None}


def read_radgenome(root: Path, *, splits, masks: Path | None = None) -> Source:
    warnings: list[str] = []
    volumes, texts = [], []
    for split in splits:
        folder = root / "dataset" / f"{split}_preprocessed"
        csv_path = root / ctrate.region_texts_csv(split)
        if not folder.is_dir():
            continue
        split_texts = read_region_texts(csv_path) if csv_path.is_file() else []
        if not csv_path.is_file():
            warnings.append(f"{csv_path} not found: every {split} volume lacks a report")
        texts += split_texts
        reports = _whole_reports(split_texts)
        labels, present = _read_labels(root, split, warnings)
        mask_root = masks or (root / ctrate.region_mask_dir(split))
        mask_root = mask_root if mask_root.is_dir() else None
        for path in sorted(folder.glob("*/*/*.nii.gz")):
            vid = _stem(path.name)
            m = _RG_FOLDER.match(path.parent.name)
            v = SourceVolume(vid, split, m.group(2) if m else None, m.group(3) if m else None, path,
                             reports.get(vid), None, _labels(labels.get(vid), present), hu_hint="fixed",
                             masks=_masks_for(mask_root, vid, ctrate.REGIONS))
            if vid not in reports:
                v.error = f"{path}: no whole-report row (empty Anatomy) for {vid} in {csv_path}"
            volumes.append(v)
    if not volumes:
        raise DataError(f"{root}: no RadGenome volumes under dataset/<split>_preprocessed for the splits {list(splits)}")
    return Source("radgenome", root, volumes, texts, warnings=warnings)


# -- generic table ---------------------------------------------------------------------------

def _opt_float(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v in (None, "") else float(v)


def read_table(path: Path, *, splits, masks: Path | None = None) -> Source:
    try:
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema_length=0)
    except Exception as e:
        raise DataError(f"{path}: cannot read the table ({e})") from e
    if "image" not in df.columns:
        raise DataError(f"{path}: needs an 'image' column (path of each NIfTI volume); found {df.columns}")
    present = [c for c in ctrate.ABNORMALITIES if c in df.columns]
    volumes, seen = [], set()
    for i, row in enumerate(df.iter_rows(named=True)):
        image = Path(str(row["image"]))
        image = image if image.is_absolute() else path.parent / image
        vid = str(row.get("volume_id") or _stem(image.name))
        split = str(row.get("split") or "train")
        if split not in splits:
            continue
        sz, sy, sx = (_opt_float(row, f"spacing_{a}") for a in "zyx")
        slope, inter = _opt_float(row, "rescale_slope"), _opt_float(row, "rescale_intercept")
        mdir = Path(str(row["mask_dir"])) if row.get("mask_dir") else None
        mdir = mdir if mdir is None or mdir.is_absolute() else path.parent / mdir
        findings = _text(row.get("findings")) or _text(row.get("report"))
        v = SourceVolume(vid, split, row.get("patient_id"), None, image if image.is_file() else None, findings,
                         _text(row.get("impressions")), _labels(row, present),
                         (sz, sy, sx) if None not in (sz, sy, sx) else None,
                         (slope, inter) if None not in (slope, inter) else None, None,
                         _masks_for(mdir.parent, mdir.name.removeprefix("seg_"), ctrate.REGIONS) if mdir else {})
        if vid in seen:
            raise DataError(f"{path} row {i + 2}: volume_id {vid!r} appears twice; give every row a unique "
                            "volume_id (or unique image file names)")
        if not image.is_file():
            v.error = f"{path} row {i + 2}: image {image} does not exist"
        elif findings is None and v.impressions is None:
            v.error = f"{path} row {i + 2}: {vid} has no report text (report / findings / impressions are empty)"
        seen.add(vid)
        volumes.append(v)
    if not volumes:
        raise DataError(f"{path}: no rows for the splits {list(splits)}")
    return Source("csv", path.parent, volumes, [])
