"""Export a labelled CT dataset into nnU-Net v2's raw format (``mv3d segment-finetune``'s first step).

``export_dataset(source, raw_root)`` writes ``<raw_root>/Dataset<ID>_<name>/``::

    imagesTr/<case>_0000.nii.gz   the CT on its own voxel grid and affine (nnU-Net resamples)
    labelsTr/<case>.nii.gz        one label map: 0 background, k = the k-th label (uint8; uint16 over 255 labels)
    dataset.json                  channel_names, labels, numTraining, file_ending, plus an "mv3d" section

**Sources.** The TotalSegmentator layout (``meta.csv`` and ``<case>/ct.nii.gz`` with
``<case>/segmentations/<structure>.nii.gz``, the split from ``meta.csv``), or whatever
:func:`mv3dtk.data.sources.read_source` reads (CT-RATE with RadGenome region masks, RadGenome, a CSV): each
volume's region masks (several files of one region are united).

**Labels.** Masks merge in ``labels`` order and a later label wins where masks overlap; ``overlaps[label]`` counts
the voxels that label took over from earlier ones.

**Intensity.** ``mv3d`` writes prep's window: the HU decision of prep (``--hu-source``, the metadata rescale, the
``*_fixed`` / RadGenome hint) then HU [-1000, 1000] -> [-1, 1] as float32, under nnU-Net's ``noNorm`` channel, so
the encoder sees its pretraining intensities. ``nnunet`` writes HU (int16 where the values allow) under the ``CT``
channel, for nnU-Net's own CT normalisation.

**Failures.** A case whose files cannot be read or whose masks disagree with its image (shape or affine) is skipped
and reported with the reason; the export fails only when no case is left. Everything is written into a temporary
sibling folder renamed into place at the end, so an interrupted export leaves the previous dataset (or none), and
a rerun replaces it.
"""

from __future__ import annotations

import csv
import json
import re
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..data import ctrate
from ..data.ingest import PrepOptions, _decide_rescale
from ..data.preprocess import orient, read_nifti, voxel_data, window
from ..data.sources import LAYOUTS as SOURCE_LAYOUTS
from ..data.sources import SourceVolume, dataset_root, read_source
from ..errors import ConfigError, DataError
from ..fs import atomic_path, clean_temporaries

LAYOUTS = ("auto", "totalseg", *SOURCE_LAYOUTS)
INTENSITIES = ("mv3d", "nnunet")
HU_SOURCES = ("auto", "raw", "fixed")
CHANNEL = {"mv3d": "noNorm", "nnunet": "CT"}
DEFAULT_NAMES = {"totalseg": "TotalSegmentator", "ctrate": "CTRATE", "radgenome": "RadGenome", "csv": "Custom"}
FILE_ENDING = ".nii.gz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_INT16 = np.iinfo(np.int16)


@dataclass
class ExportReport:
    dataset_dir: Path
    cases: list[str]  # exported, in order
    labels: list[str]  # label k (1-based) = labels[k - 1]
    overlaps: dict[str, int]  # label -> voxels it took over from earlier labels (summed over cases)
    case_split: dict[str, str]  # case -> its split in the source (train / val / test, train / valid, ...)
    skipped: dict[str, str]  # case -> why it was left out
    layout: str = ""
    intensity: str = ""
    voxels: dict[str, int] = field(default_factory=dict)  # label -> voxels of its masks (before merging)
    empty_labels: list[str] = field(default_factory=list)  # labels whose masks are empty in every exported case
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        over = sum(self.overlaps.values())
        return (f"export: {len(self.cases)} cases, {len(self.labels)} labels ({self.layout}, intensity "
                f"{self.intensity}) -> {self.dataset_dir}; {len(self.skipped)} skipped, {over} overlapping voxels")


# -- reading the source --------------------------------------------------------------------------------------

def _mask_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")


def is_totalseg(root: Path) -> bool:
    return root.is_dir() and (root / "meta.csv").is_file() and any(
        (p / "ct.nii.gz").is_file() for p in root.iterdir() if p.is_dir())


def _read_meta(path: Path) -> dict[str, str]:
    """TotalSegmentator's ``meta.csv`` (semicolon-separated, maybe with a BOM): case -> split."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    if rows and not {"image_id", "split"} <= set(rows[0]):
        raise DataError(f"{path}: expected TotalSegmentator's semicolon-separated columns image_id;...;split; found "
                        f"{list(rows[0])}")
    return {r["image_id"].strip(): (r["split"] or "").strip() for r in rows}


def read_totalseg(root: Path, splits: Iterable[str] | None) -> tuple[list[SourceVolume], dict[str, str]]:
    """The cases of a TotalSegmentator folder as :class:`SourceVolume` (HU known: ``hu_hint="fixed"``), and the
    cases left out with the reason."""
    meta = _read_meta(root / "meta.csv") if (root / "meta.csv").is_file() else {}
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file()}
    keep = None if splits is None else set(splits)
    volumes, skipped = [], {}
    for case in sorted(set(folders) | set(meta)):
        split = meta.get(case) or "unknown"
        if keep is not None and split not in keep:
            continue
        if case not in folders:
            skipped[case] = f"{root / 'meta.csv'} lists {case}, but {root / case / 'ct.nii.gz'} does not exist"
            continue
        seg = folders[case] / "segmentations"
        files = sorted(seg.glob("*.nii.gz")) + sorted(seg.glob("*.nii")) if seg.is_dir() else []
        masks = {_mask_stem(p): (p,) for p in files}
        volumes.append(SourceVolume(case, split, image_path=folders[case] / "ct.nii.gz", hu_hint="fixed",
                                    masks=masks))
    return volumes, skipped


def read_cases(source: str | Path, layout: str = "auto", splits: Iterable[str] | None = None,
               masks: str | Path | None = None) -> tuple[str, list[SourceVolume], dict[str, str]]:
    """``(layout, volumes with an image and at least one mask, {case: why skipped})``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    root = dataset_root(source)
    if layout == "totalseg" or (layout == "auto" and is_totalseg(root)):
        if not root.is_dir():
            raise DataError(f"{root}: a TotalSegmentator dataset is a folder (<case>/ct.nii.gz, meta.csv)")
        volumes, skipped = read_totalseg(root, splits)
        layout = "totalseg"
    else:
        src = read_source(root, layout=layout, splits=tuple(splits or ctrate.SPLITS), masks=masks)
        layout, volumes, skipped = src.layout, [], {}
        for v in src.volumes:
            if v.image_path is None:  # report-only problems (v.error with an image) do not matter here
                skipped[v.volume_id] = v.error or f"{v.volume_id}: no image file"
            else:
                volumes.append(v)
    for v in volumes:
        if not v.masks:
            skipped[v.volume_id] = f"{v.image_path}: no mask files for {v.volume_id}"
    volumes = [v for v in volumes if v.masks]
    if not volumes:
        why = "; ".join(list(skipped.values())[:3])
        raise DataError(f"{root}: no case with an image and masks to export ({layout} layout"
                        f"{', splits ' + ', '.join(splits) if splits else ''}){': ' + why if why else ''}")
    return layout, volumes, skipped


# -- one case ------------------------------------------------------------------------------------------------

def _check_geometry(case: str, image_path: Path, img, mask_path: Path, m) -> None:
    if m.shape[:3] != img.shape[:3]:
        raise DataError(f"case {case}: the mask {mask_path} has shape {tuple(m.shape)}, its image {image_path} "
                        f"{tuple(img.shape)}; masks must be on the image's voxel grid (fix or drop the case)")
    if not np.allclose(m.affine, img.affine, atol=1e-3):
        raise DataError(f"case {case}: the mask {mask_path} has another affine than its image {image_path} "
                        f"(mask {np.round(m.affine, 3).tolist()}, image {np.round(img.affine, 3).tolist()}); masks "
                        "must be on the image's voxel grid (fix or drop the case)")


def label_map(sv: SourceVolume, img, labels: list[str]) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """The merged (i, j, k) label map of one case (a later label wins), the voxels each label took over from earlier
    ones, and the voxels of each label's own masks."""
    seg = np.zeros(img.shape[:3], np.uint8 if len(labels) <= 255 else np.uint16)
    overlaps, voxels = {}, {}
    for k, name in enumerate(labels, 1):
        united = None
        for path in sv.masks.get(name, ()):
            m = read_nifti(path)
            _check_geometry(sv.volume_id, sv.image_path, img, path, m)
            mask = np.asarray(voxel_data(m, path)) > 0
            united = mask if united is None else united | mask
        if united is None:
            continue
        voxels[name] = int(united.sum())
        overlaps[name] = int(np.count_nonzero(united & (seg != 0)))
        seg[united] = k
    return seg, overlaps, voxels


def hu_decision(sv: SourceVolume, img, stored: np.ndarray, hu_source: str) -> tuple[tuple | None, list[str]]:
    """prep's decision for one volume: the rescale (slope, intercept) to apply or None, and its warnings."""
    oriented = orient(stored, img.affine).array  # prep reads the voxels in this order
    guess = ctrate.guess_hu(oriented)
    rescale = _decide_rescale(sv, guess, hu_source)
    warnings = ctrate.hu_warnings(sv.image_path, guess, rescale, hu_source, sv.hu_hint == "fixed",
                                  (getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)))
    return rescale, warnings


def image_values(stored: np.ndarray, rescale: tuple | None, intensity: str,
                 hu_window: tuple[float, float]) -> np.ndarray:
    """The voxels to write: prep's window as float32 (``mv3d``) or HU, int16 where exact (``nnunet``)."""
    if intensity == "nnunet" and rescale is None and stored.dtype.kind in "iu":
        if stored.min() >= _INT16.min and stored.max() <= _INT16.max:
            return stored.astype(np.int16, copy=False)
        return stored.astype(np.float32)
    x = stored.astype(np.float32)  # a copy
    if rescale is not None:
        x *= rescale[0]
        x += rescale[1]
    if intensity == "mv3d":
        return window(x, *hu_window)
    if np.array_equal(x, np.rint(x)) and x.min() >= _INT16.min and x.max() <= _INT16.max:
        return x.astype(np.int16)
    return x


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def export_case(sv: SourceVolume, out_dir: Path, labels: list[str], intensity: str, hu_source: str,
                hu_window: tuple[float, float]) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """Write one case's image and label map under ``out_dir``; returns (overlaps, voxels, warnings)."""
    img = read_nifti(sv.image_path)
    stored = np.asarray(voxel_data(img, sv.image_path))  # (i, j, k), header scaling applied
    seg, overlaps, voxels = label_map(sv, img, labels)
    rescale, warnings = hu_decision(sv, img, stored, hu_source)
    values = image_values(stored, rescale, intensity, hu_window)
    image_file = out_dir / "imagesTr" / f"{sv.volume_id}_0000{FILE_ENDING}"
    label_file = out_dir / "labelsTr" / f"{sv.volume_id}{FILE_ENDING}"
    try:
        _save(values, img.affine, image_file)
        _save(seg, img.affine, label_file)
    except BaseException:
        image_file.unlink(missing_ok=True)
        label_file.unlink(missing_ok=True)
        raise
    return overlaps, voxels, warnings


def _try_case(sv: SourceVolume, out_dir: Path, *args) -> tuple[tuple | None, str | None]:
    """:func:`export_case`, with a bad case turned into the reason it is skipped (one does not sink the export)."""
    try:
        return export_case(sv, out_dir, *args), None
    except DataError as e:
        return None, str(e)
    except MemoryError:
        return None, f"case {sv.volume_id}: {sv.image_path}: out of memory while exporting"
    except Exception as e:
        return None, (f"case {sv.volume_id}: {sv.image_path}: unexpected {type(e).__name__}: {e}\n"
                      f"{traceback.format_exc()}")


# -- the dataset ---------------------------------------------------------------------------------------------

def _check_options(dataset_id: int, intensity: str, hu_source: str, labels: list[str] | None) -> None:
    if not 1 <= int(dataset_id) <= 999:
        raise ConfigError(f"dataset id {dataset_id} is out of nnU-Net's range; pass --dataset-id between 1 and 999")
    if intensity not in INTENSITIES:
        raise ConfigError(f"unknown intensity {intensity!r}; use one of {', '.join(INTENSITIES)}")
    if hu_source not in HU_SOURCES:
        raise ConfigError(f"unknown HU source {hu_source!r}; use one of {', '.join(HU_SOURCES)}")
    if labels is not None:
        if not labels:
            raise ConfigError("the label list is empty; name at least one structure (one per line in --labels)")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"labels {dup} are listed more than once; list each structure once, in merge order")
        if "background" in labels:
            raise ConfigError("'background' is nnU-Net's label 0 and cannot be a structure; drop it from --labels")


def _check_name(name: str, dataset_id: int) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"dataset name {name!r}: use letters, digits, '_' and '-' only (it becomes "
                          f"Dataset{int(dataset_id):03d}_<name>)")


def _choose_labels(volumes: list[SourceVolume], labels: list[str] | None) -> list[str]:
    present = sorted({name for v in volumes for name in v.masks})
    if labels is None:
        if "background" in present:
            raise ConfigError("a mask file is named 'background', nnU-Net's label 0; rename it or pass --labels")
        return present
    missing = [x for x in labels if x not in present]
    if missing:
        raise ConfigError(f"no case has a mask for {missing}; the labels present are: {', '.join(present)}. Fix the "
                          "names in --labels (one per line, in merge order)")
    return list(labels)


def _check_target(raw_root: Path, dataset_id: int, name: str) -> Path:
    target = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    others = sorted(p.name for p in raw_root.glob(f"Dataset{int(dataset_id):03d}_*")
                    if p.is_dir() and p != target) if raw_root.is_dir() else []
    if others:
        raise ConfigError(f"{raw_root} already holds {others[0]} with the id {int(dataset_id):03d}; nnU-Net needs "
                          "one dataset per id: pass another --dataset-id or remove that folder")
    return target


def dataset_json(report: ExportReport, source, hu_window) -> dict:
    mv3d = {"source": str(source), "layout": report.layout, "intensity": report.intensity, "labels": report.labels,
            "overlaps": report.overlaps, "voxels": report.voxels, "empty_labels": report.empty_labels,
            "case_split": report.case_split, "skipped": {c: why.splitlines()[0] for c, why in report.skipped.items()}}
    if report.intensity == "mv3d":
        mv3d["hu_window"] = list(hu_window)
    return {"name": report.dataset_dir.name.split("_", 1)[1],
            "description": f"exported by mv3d from {source} ({report.layout} layout)",
            "channel_names": {"0": CHANNEL[report.intensity]},
            "labels": {"background": 0, **{x: k for k, x in enumerate(report.labels, 1)}},
            "numTraining": len(report.cases), "file_ending": FILE_ENDING, "mv3d": mv3d}


def export_dataset(source: str | Path, raw_root: str | Path, *, dataset_id: int = 501, name: str | None = None,
                   layout: str = "auto", labels: list[str] | None = None, intensity: str = "mv3d",
                   splits: Iterable[str] | None = None, hu_source: str = "auto",
                   hu_window: tuple[float, float] | None = None, masks: str | Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write ``<raw_root>/Dataset<dataset_id>_<name>/`` from ``source`` (see the module docstring).

    ``labels``: structure names in merge order (a later one wins); None = every mask name found, sorted.
    ``splits``: the source splits to export (TotalSegmentator's train / val / test; CT-RATE's train / valid);
    None = all of TotalSegmentator, CT-RATE's train and valid. ``hu_source`` and ``hu_window`` as prep's
    (``--hu-source``; the window defaults to prep's HU [-1000, 1000]). ``masks``: another mask root for the CT-RATE
    layouts (prep's ``--masks``). ``progress(done, total)`` is called after each case.
    """
    hu_window = tuple(hu_window or PrepOptions().hu)
    labels = None if labels is None else [str(x).strip() for x in labels]
    splits = None if splits is None else tuple(splits)
    _check_options(dataset_id, intensity, hu_source, labels)
    layout, volumes, skipped = read_cases(source, layout, splits, masks)
    name = name or DEFAULT_NAMES[layout]
    _check_name(name, dataset_id)
    explicit = labels is not None
    labels = _choose_labels(volumes, labels)
    raw_root = Path(raw_root)
    target = _check_target(raw_root, dataset_id, name)
    raw_root.mkdir(parents=True, exist_ok=True)
    clean_temporaries(raw_root)
    report = ExportReport(target, [], labels, {x: 0 for x in labels}, {}, skipped, layout, intensity,
                          {x: 0 for x in labels})
    with atomic_path(target) as tmp:
        for sub in ("imagesTr", "labelsTr"):
            (tmp / sub).mkdir(parents=True)
        for done, sv in enumerate(volumes, 1):
            result, error = _try_case(sv, tmp, labels, intensity, hu_source, hu_window)
            if error is not None:
                report.skipped[sv.volume_id] = error
            else:
                _add_case(report, sv, *result)
            if progress is not None:
                progress(done, len(volumes))
        _finish(report, explicit)
        (tmp / "dataset.json").write_text(json.dumps(dataset_json(report, source, hu_window), indent=2) + "\n",
                                          encoding="utf-8")
    return report


def _add_case(report: ExportReport, sv: SourceVolume, overlaps: dict, voxels: dict, warnings: list[str]) -> None:
    report.cases.append(sv.volume_id)
    report.case_split[sv.volume_id] = sv.split
    for x, n in overlaps.items():
        report.overlaps[x] += n
    for x, n in voxels.items():
        report.voxels[x] += n
    report.warnings += warnings


def _finish(report: ExportReport, explicit: bool) -> None:
    """Fail when nothing was exported, or when a requested label is empty in every case (inside the temporary
    folder, so nothing is left behind)."""
    if not report.cases:
        reasons = "\n".join(f"  {c}: {why.splitlines()[0]}" for c, why in list(report.skipped.items())[:5])
        raise DataError(f"no case could be exported ({len(report.skipped)} skipped):\n{reasons}\nfix the files named "
                        "above, or leave those cases out")
    report.empty_labels = [x for x in report.labels if report.voxels[x] == 0]
    if report.empty_labels and explicit:
        raise ConfigError(f"the masks of {report.empty_labels} are empty in every exported case "
                          f"({len(report.cases)}); drop them from --labels")
    if report.empty_labels:
        report.warnings.append(f"labels {report.empty_labels} are empty in every exported case")
