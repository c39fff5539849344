"""Tests for the synthetic CT-RATE / RadGenome generator (real files, no mocks)."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mv3dtk.data.ctrate import (ABNORMALITIES, METADATA_COLUMNS, REGIONS, REPORT_COLUMNS, NOT_GIVEN,
                                labels_csv, metadata_csv, region_mask_dir, region_texts_csv,
                                reports_csv, volume_relpath, vqa_json)
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.data.synth_text import question_items
from mv3dtk.vqa.data import read_vqa

SHAPE = (48, 96, 96)  # (D, H, W)
SPACING = (3.0, 0.75, 0.75)  # (z, y, x)
SPLITS = ("train", "valid")
FINE = ("right lung", "left lung", "aorta", "vertebrae", "liver")

# Words that must appear when an abnormality is reported present.
KEYWORDS = {
    "Medical material": r"catheter|\bport\b|medical material|device",
    "Arterial wall calcification": r"calcif\w*.*aort|aort\w*.*calcif|aortic wall",
    "Cardiomegaly": r"cardiomegaly|heart is enlarged|heart size is increased|cardiac contour is enlarged",
    "Pericardial effusion": r"pericardial (effusion|fluid|space)",
    "Coronary artery wall calcification": r"coronary",
    "Hiatal hernia": r"hiatal|hiatus",
    "Lymphadenopathy": r"lymph",
    "Emphysema": r"emphysem",
    "Atelectasis": r"atelecta",
    "Lung nodule": r"nodul",
    "Lung opacity": r"opacit|ground.glass",
    "Pulmonary fibrotic sequela": r"fibro|sequela",
    "Pleural effusion": r"pleural (effusion|fluid)",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronchial|bronchial wall thickening",
    "Consolidation": r"consolidat",
    "Bronchiectasis": r"bronchiecta",
    "Interlobular septal thickening": r"septa",
}
NEGATION = re.compile(r"\b(no|not|without|normal|within normal limits|unremarkable)\b", re.I)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    calls = []
    summary = make_synthetic_dataset(out, n_train=6, n_valid=3, shape=SHAPE, spacing=SPACING, seed=0,
                                     progress=lambda done, total: calls.append((done, total)))
    return out, summary, calls


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def _split(volume: str) -> str:
    return volume.split("_", 1)[0]


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _mask(root: Path, volume: str, region: str) -> np.ndarray:
    return _load(root / region_mask_dir(_split(volume)) / f"seg_{volume[:-7]}" / f"{region}.nii.gz").astype(bool)


def _fine(root: Path, volume: str, leaf: str) -> np.ndarray:
    folder = root / "dataset" / f"{_split(volume)}_anatomy_mask" / f"seg_{volume[:-7]}"
    return _load(folder / f"{leaf}.nii.gz").astype(bool)


def _labels(root: Path) -> dict[str, dict[str, int]]:
    out = {}
    for split in SPLITS:
        for r in _rows(root / labels_csv(split)):
            out[r["VolumeName"]] = {k: int(v) for k, v in r.items() if k != "VolumeName"}
    return out


def _reports(root: Path) -> dict[str, dict]:
    return {r["VolumeName"]: r for split in SPLITS for r in _rows(root / reports_csv(split))}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:  # RAS mm
    ijk = np.argwhere(mask).mean(0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _first_volumes(root: Path, labels: dict) -> list[str]:
    return [v for v in labels if v.endswith("_1.nii.gz")]


# ---------------------------------------------------------------------------------------------
# Layout and determinism
# ---------------------------------------------------------------------------------------------
def test_summary_and_progress(ds):
    root, summary, calls = ds
    assert summary.root == root
    assert summary.n_volumes == {"train": 6 + 2, "valid": 3 + 1}  # every third scan has 2 recons
    assert len(summary.volume_names) == len(set(summary.volume_names)) == 12
    assert calls == [(i + 1, 12) for i in range(12)]
    assert summary.files_written == sum(1 for p in root.rglob("*") if p.is_file())
    assert not [p for p in root.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_layout_paths_and_csv_headers(ds):
    root, summary, _ = ds
    for v in summary.volume_names:
        assert v.endswith(".nii.gz")
        assert (root / volume_relpath(v)).is_file()
        for region in REGIONS:
            assert (root / region_mask_dir(_split(v)) / f"seg_{v[:-7]}" / f"{region}.nii.gz").is_file()
        for leaf in FINE:
            assert (root / "dataset" / f"{_split(v)}_anatomy_mask" / f"seg_{v[:-7]}" / f"{leaf}.nii.gz").is_file()
    for split in SPLITS:
        names = [v for v in summary.volume_names if v.startswith(split + "_")]
        assert _header(root / reports_csv(split)) == list(REPORT_COLUMNS)
        assert _header(root / labels_csv(split)) == ["VolumeName", *ABNORMALITIES]
        assert _header(root / metadata_csv(split)) == list(METADATA_COLUMNS)
        assert _header(root / region_texts_csv(split)) == ["Volumename", "Anatomy", "Sentence"]
        for table in (reports_csv, labels_csv, metadata_csv):
            assert [r["VolumeName"] for r in _rows(root / table(split))] == names
        for r in _rows(root / labels_csv(split)):
            assert {int(r[a]) for a in ABNORMALITIES} <= {0, 1}


def test_metadata_values(ds):
    root, _, _ = ds
    for split in SPLITS:
        for r in _rows(root / metadata_csv(split)):
            assert [float(x) for x in ast.literal_eval(r["XYSpacing"])] == [SPACING[1], SPACING[2]]
            assert float(r["ZSpacing"]) == SPACING[0]
            assert (int(r["Rows"]), int(r["Columns"]), int(r["NumberofSlices"])) == (SHAPE[1], SHAPE[2], SHAPE[0])
            assert (float(r["RescaleSlope"]), float(r["RescaleIntercept"]), r["RescaleType"]) == (1, -1024, "HU")
            assert ast.literal_eval(r["ImageOrientationPatient"]) == [1, 0, 0, 0, 1, 0]
            assert re.fullmatch(r"\d{3}Y", r["PatientAge"]) and r["PatientSex"] in ("M", "F")
            assert re.fullmatch(r"20\d{6}", r["StudyDate"])
            ipp = ast.literal_eval(r["ImagePositionPatient"])
            aff = nib.load(root / volume_relpath(r["VolumeName"])).affine
            np.testing.assert_allclose(ipp, [-aff[0, 3], -aff[1, 3], aff[2, 3]], atol=1e-3)


def test_reconstructions_share_report_and_not_given(ds):
    root, summary, _ = ds
    reports = _reports(root)
    pairs = [(v, v.replace("_1.nii.gz", "_2.nii.gz")) for v in summary.volume_names if v.endswith("_1.nii.gz")]
    pairs = [(a, b) for a, b in pairs if b in reports]
    assert pairs, "no scan with two reconstructions"
    for a, b in pairs:
        assert {k: v for k, v in reports[a].items() if k != "VolumeName"} == \
               {k: v for k, v in reports[b].items() if k != "VolumeName"}
        assert not np.array_equal(_load(root / volume_relpath(a)), _load(root / volume_relpath(b)))
    cells = [r[c] for r in reports.values() for c in REPORT_COLUMNS[1:]]
    assert NOT_GIVEN in cells
    assert all(r["Findings_EN"] not in ("", NOT_GIVEN) for r in reports.values())


def test_determinism_and_seed(tmp_path):
    kw = dict(n_train=2, n_valid=1, shape=(32, 64, 64), spacing=(2.5, 1.0, 1.0), seed=3)
    make_synthetic_dataset(tmp_path / "a", **kw)
    make_synthetic_dataset(tmp_path / "b", **kw)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha == hb and len(ha) > 50
    make_synthetic_dataset(tmp_path / "c", **{**kw, "seed": 4})
    hc = _hashes(tmp_path / "c")
    vol = str(volume_relpath("train_1_a_1.nii.gz"))
    assert hc[vol] != ha[vol]
    # More scans never change the earlier ones.
    make_synthetic_dataset(tmp_path / "d", **{**kw, "n_train": 4})
    hd = _hashes(tmp_path / "d")
    assert all(hd[k] == ha[k] for k in ha if k.endswith(".nii.gz"))


def test_raw_is_fixed_plus_1024(tmp_path):
    kw = dict(n_train=1, n_valid=1, shape=(24, 48, 48), seed=5)
    make_synthetic_dataset(tmp_path / "fixed", **kw)
    make_synthetic_dataset(tmp_path / "raw", hu="raw", **kw)
    rel = volume_relpath("train_1_a_1.nii.gz")
    fixed = _load(tmp_path / "fixed" / rel).astype(np.int32)
    raw = _load(tmp_path / "raw" / rel).astype(np.int32)
    assert raw.min() >= 0 and fixed.min() == -1024
    assert np.all(raw[fixed > -1024] - fixed[fixed > -1024] == 1024)
    assert np.all(raw[fixed == -1024] == 0)
    meta = {r["VolumeName"]: r for r in _rows(tmp_path / "raw" / metadata_csv("train"))}
    assert float(meta["train_1_a_1.nii.gz"]["RescaleIntercept"]) == -1024


# ---------------------------------------------------------------------------------------------
# NIfTI, HU and anatomy
# ---------------------------------------------------------------------------------------------
def test_nifti_headers_and_masks(ds):
    root, summary, _ = ds
    d, h, w = SHAPE
    for v in summary.volume_names[:3] + summary.volume_names[-2:]:
        img = nib.load(root / volume_relpath(v))
        assert img.get_data_dtype() == np.int16
        assert img.shape == (w, h, d)
        assert img.header.get_zooms() == pytest.approx((SPACING[2], SPACING[1], SPACING[0]))
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert img.header.get_xyzt_units()[0] == "mm"
        slope, inter = img.header.get_slope_inter()
        assert slope in (None, 1.0) and inter in (None, 0.0)
        for region in REGIONS:
            m = nib.load(root / region_mask_dir(_split(v)) / f"seg_{v[:-7]}" / f"{region}.nii.gz")
            arr = np.asanyarray(m.dataobj)
            assert arr.shape == img.shape and arr.dtype == np.uint8
            np.testing.assert_allclose(m.affine, img.affine)
            assert set(np.unique(arr)) == {0, 1}, region


def test_hu_values_fixed(ds):
    root, summary, _ = ds
    v = summary.volume_names[0]
    hu = _load(root / volume_relpath(v)).astype(np.float32)
    assert abs(np.median(hu[_mask(root, v, "lung")]) + 850) < 40
    w = hu.shape[0]
    air = hu[w // 2 - 3:w // 2 + 3, 1:4, :]  # anterior to the body, inside the field of view
    assert abs(np.median(air) + 1000) < 50
    assert np.all(hu[0, 0, :] == -1024)  # corner: outside the circular field of view
    bone = hu[_mask(root, v, "bone")]
    assert np.median(bone) > 250
    assert 10 < np.std(hu[w // 2 - 3:w // 2 + 3, 1:4, :]) < 40  # noise


def test_anatomy_orientation_in_world_coordinates(ds):
    """Centroids in RAS mm (+x = patient right, +y = anterior, +z = superior)."""
    root, summary, _ = ds
    for v in summary.volume_names[:2]:
        img = nib.load(root / volume_relpath(v))
        hu, aff = np.asanyarray(img.dataobj), img.affine
        body = (hu > -500) | _mask(root, v, "lung")
        c_body = _world_centroid(body, aff)
        assert _world_centroid(_mask(root, v, "heart"), aff)[0] < c_body[0]  # heart on the left
        assert _world_centroid(_fine(root, v, "liver"), aff)[0] > c_body[0]  # liver on the right
        right, left = (_world_centroid(_fine(root, v, f"{s} lung"), aff) for s in ("right", "left"))
        assert right[0] > left[0]
        spine = _world_centroid(_fine(root, v, "vertebrae"), aff)
        assert abs(spine[0] - c_body[0]) < 5 and spine[1] < c_body[1] - 10  # midline, posterior
        bone = _mask(root, v, "bone")
        bone_y = (aff[:3, :3] @ np.argwhere(bone).T + aff[:3, 3:4])[1]
        assert bone_y.max() > c_body[1] + 20  # the sternum is anterior
        assert _world_centroid(_mask(root, v, "abdomen"), aff)[2] < _world_centroid(_mask(root, v, "lung"), aff)[2]
        assert _world_centroid(_mask(root, v, "thyroid"), aff)[2] > _world_centroid(_mask(root, v, "heart"), aff)[2]


# ---------------------------------------------------------------------------------------------
# Labels agree with what is drawn
# ---------------------------------------------------------------------------------------------
def _split_by(labels, name, exclude=()):
    vols = [v for v in labels if not any(labels[v][e] for e in exclude)]
    pos = [v for v in vols if labels[v][name]]
    neg = [v for v in vols if not labels[v][name]]
    assert pos and neg, f"fixture lacks positives or negatives for {name}"
    return pos, neg


def test_pleural_effusion_is_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)

    def fluid(v):
        hu, pleura = _load(root / volume_relpath(v)), _mask(root, v, "pleura")
        return ((hu > -50) & (hu < 50) & pleura).sum() / pleura.sum()
    pos, neg = _split_by(labels, "Pleural effusion")
    assert min(map(fluid, pos)) > 0.02
    assert max(map(fluid, neg)) < 0.01


def test_cardiomegaly_is_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)
    pos, neg = _split_by(labels, "Cardiomegaly", exclude=("Pericardial effusion",))
    size = lambda v: _mask(root, v, "heart").sum()  # noqa: E731
    assert min(map(size, pos)) > 1.3 * max(map(size, neg))


def test_pericardial_effusion_and_coronary_calcification_are_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)

    def fluid(v):  # fraction of the heart region at fluid density (myocardium is ~40 HU)
        hu, heart = _load(root / volume_relpath(v)), _mask(root, v, "heart")
        return ((hu > -30) & (hu < 25) & heart).sum() / heart.sum()
    pos, neg = _split_by(labels, "Pericardial effusion")
    assert min(map(fluid, pos)) > max(map(fluid, neg)) + 0.1

    def coronary(v):  # bright voxels on the heart surface, away from the aorta, bone and metal
        hu = _load(root / volume_relpath(v))
        near = ndimage.binary_dilation(_mask(root, v, "heart"), iterations=2) & ~_mask(root, v, "bone")
        near &= ~ndimage.binary_dilation(_fine(root, v, "aorta") | (hu > 1500), iterations=3)
        return ((hu > 400) & near).sum()
    pos, neg = _split_by(labels, "Coronary artery wall calcification")
    assert min(map(coronary, pos)) > 5 and max(map(coronary, neg)) == 0


def _compact_dense_blobs(root, v, min_mm=3.5, max_mm=15.0):
    """Dense (> -300 HU) lung blobs, thicker than vessels (3x3 opening) and 3.5-15 mm across."""
    img = nib.load(root / volume_relpath(v))
    hu, zooms = np.asanyarray(img.dataobj), np.array(img.header.get_zooms())
    dense = ndimage.binary_opening((hu > -300) & _mask(root, v, "lung"), np.ones((3, 3, 1), bool))
    lab, _ = ndimage.label(dense)
    sizes = [np.array([s.stop - s.start for s in sl]) * zooms for sl in ndimage.find_objects(lab)]
    return [s for s in sizes if min_mm <= s[:2].max() and s.max() <= max_mm]


def test_lung_nodule_is_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)
    pos, neg = _split_by(labels, "Lung nodule", exclude=("Consolidation",))
    assert all(_compact_dense_blobs(root, v) for v in pos)
    assert not any(_compact_dense_blobs(root, v) for v in neg)


def test_lymphadenopathy_is_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)

    def nodes(v):
        hu = _load(root / volume_relpath(v))
        aorta = ndimage.binary_dilation(_fine(root, v, "aorta"), np.ones((3, 3, 1), bool))
        core = ndimage.binary_erosion(_mask(root, v, "mediastinum") & ~aorta, np.ones((3, 3, 1), bool))
        return ((hu > -20) & (hu < 120) & core).sum()
    pos, neg = _split_by(labels, "Lymphadenopathy", exclude=("Medical material",))
    assert min(map(nodes, pos)) > max(map(nodes, neg)) + 5


def test_bright_findings_are_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)
    pos, neg = _split_by(labels, "Medical material")
    metal = lambda v: (_load(root / volume_relpath(v)) > 1500).sum()  # noqa: E731
    assert min(map(metal, pos)) > 10 and max(map(metal, neg)) == 0

    def aortic_calc(v):
        hu = _load(root / volume_relpath(v))
        near = ndimage.binary_dilation(_fine(root, v, "aorta"), iterations=2) & ~_mask(root, v, "bone")
        near &= ~ndimage.binary_dilation(hu > 1500, iterations=3)  # not the catheter
        return ((hu > 500) & near).sum()
    pos, neg = _split_by(labels, "Arterial wall calcification")
    assert min(map(aortic_calc, pos)) > 5 and max(map(aortic_calc, neg)) == 0


def test_emphysema_and_hernia_are_drawn(ds):
    root, _, _ = ds
    labels = _labels(root)
    emph = lambda v: ((_load(root / volume_relpath(v)) < -950) & _mask(root, v, "lung")).sum()  # noqa: E731
    pos, neg = _split_by(labels, "Emphysema")
    assert min(map(emph, pos)) > 2 * max(map(emph, neg)) + 20
    pos, neg = _split_by(labels, "Hiatal hernia")
    eso = lambda v: _mask(root, v, "esophagus").sum()  # noqa: E731
    assert min(map(eso, pos)) > 1.2 * max(map(eso, neg))


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def test_reports_agree_with_labels(ds):
    root, _, _ = ds
    labels, reports = _labels(root), _reports(root)
    for v, lab in labels.items():
        findings = reports[v]["Findings_EN"]
        for name, pattern in KEYWORDS.items():
            hits = [s for s in _sentences(findings) if re.search(pattern, s, re.I)]
            if lab[name]:
                assert any(not NEGATION.search(s) for s in hits), (v, name, findings)
            else:
                assert all(NEGATION.search(s) for s in hits), (v, name, hits)
        impression = reports[v]["Impressions_EN"]
        for name in ABNORMALITIES:
            if not lab[name]:
                assert name not in impression, (v, name)


def test_paraphrase_variety_and_small_volumes(tmp_path):
    make_synthetic_dataset(tmp_path, n_train=16, n_valid=1, shape=(16, 40, 40), spacing=(4.0, 1.5, 1.5), seed=7)
    labels, reports = _labels(tmp_path), _reports(tmp_path)
    varied = 0
    for name, pattern in KEYWORDS.items():
        used = {s for v in labels if labels[v][name] and v.endswith("_1.nii.gz")
                for s in _sentences(reports[v]["Findings_EN"]) if re.search(pattern, s, re.I)}
        varied += len(used) >= 2
    assert varied >= 10
    firsts = [v for v in labels if v.endswith("_1.nii.gz")]
    assert len({reports[v]["Findings_EN"] for v in firsts}) == len(firsts) == 17


def test_region_sentences(ds):
    root, summary, _ = ds
    labels, reports = _labels(root), _reports(root)
    for split in SPLITS:
        rows = _rows(root / region_texts_csv(split))
        vols = [r["Volumename"] for r in rows]
        assert set(vols) == {v for v in summary.volume_names if v.startswith(split) and v.endswith("_1.nii.gz")}
        for r in rows:
            assert r["Sentence"].strip()
            if r["Anatomy"]:
                assert r["Anatomy"].split("/")[0] in REGIONS
                assert all(x in reports[r["Volumename"]]["Findings_EN"] for x in _sentences(r["Sentence"]))
        for v in set(vols):
            mine = [r for r in rows if r["Volumename"] == v]
            assert mine[0]["Anatomy"] == "" and reports[v]["Findings_EN"] in mine[0]["Sentence"]
            if labels[v]["Pleural effusion"]:
                pleura = " ".join(r["Sentence"] for r in mine if r["Anatomy"].startswith("pleura"))
                assert re.search(KEYWORDS["Pleural effusion"], pleura, re.I)
            if labels[v]["Lung nodule"]:
                lung = " ".join(r["Sentence"] for r in mine if r["Anatomy"].startswith("lung"))
                assert "nodul" in lung


def test_vqa_json(ds):
    root, summary, _ = ds
    labels = _labels(root)
    tokens = {"free_response": "<long_answer>", "short_answer": "<short_answer>",
              "multiple_choice": "<multiple_choice>", "report_generation": "<report_generation>"}
    for split in SPLITS:
        items = json.loads((root / vqa_json(split)).read_text(encoding="utf-8"))
        seen = set()
        assert len({it["id"] for it in items}) == len(items)
        for it in items:
            assert it["image"].endswith(".nii.gz") and it["image"] in summary.volume_names
            conv = it["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            for n, (q, a) in enumerate(zip(conv[::2], conv[1::2])):
                assert q["value"].startswith("<image>\n") == (n == 0)
                assert q["value"].rstrip().endswith(tokens[q["type"]])
                seen.add(q["type"])
                _check_answer(q, a["value"], labels[it["image"]])
        assert seen == set(tokens)
        assert {it["image"] for it in items} == {v for v in summary.volume_names if v.startswith(split)}


def test_drawn_question_items_follow_the_labels_and_read_back(tmp_path):
    """``question_items`` (the VQA benchmark's extra questions): n short + n MC turns, answered from the labels."""
    lab = {n: int(i % 3 == 0) for i, n in enumerate(ABNORMALITIES)}
    item = question_items("train_7_a_1.nii.gz", lab, np.random.default_rng(0), 5)
    conv = item["conversations"]
    assert [t["type"] for t in conv[::2]] == ["short_answer", "multiple_choice"] * 5
    assert conv[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in conv[1:])
    answers = [a["value"] for a in conv[1::2]]
    for q, a in zip(conv[::2], answers):
        _check_answer(q, a, lab)
    assert {"Yes.", "No."} <= set(answers)  # both answers drawn, not one constant
    path = tmp_path / "q.json"
    path.write_text(json.dumps([item]))
    assert read_vqa(path)[0]["volume_id"] == "train_7_a_1"


def _check_answer(q: dict, answer: str, lab: dict) -> None:
    if q["type"] == "short_answer":
        name = next(n for n in ABNORMALITIES if n.lower() in q["value"].lower())
        assert answer == ("Yes." if lab[name] else "No.")
    elif q["type"] == "multiple_choice":
        options = dict(re.findall(r"\(([a-d])\) (.+?)(?= \([a-d]\) | <multiple_choice>)", q["value"]))
        assert len(options) == 4
        m = re.fullmatch(r"\(([a-d])\) (.+)", answer)
        assert m and options[m.group(1)] == m.group(2)
        if m.group(2) in lab:
            assert lab[m.group(2)] == (0 if "NOT" in q["value"] else 1)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"shape": (8, 64, 64)}, "shape"),
    ({"shape": (32, 64)}, "shape"),
    ({"spacing": (0.0, 0.75, 0.75)}, "spacing"),
    ({"spacing": (1.0, -1.0, 0.75)}, "spacing"),
    ({"n_train": 0}, "n_train"),
    ({"n_valid": -2}, "n_valid"),
    ({"hu": "hounsfield"}, "hu"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_no_fine_anatomies(tmp_path):
    s = make_synthetic_dataset(tmp_path, n_train=1, n_valid=1, shape=(16, 32, 32), fine_anatomies=False)
    assert not (tmp_path / "dataset" / "train_anatomy_mask").exists()
    assert s.files_written == sum(1 for p in tmp_path.rglob("*") if p.is_file())
    assert math.isclose(s.n_volumes["train"], 2)


@pytest.mark.parametrize("name, hu", [("Consolidation", (-200, 200)), ("Lung opacity", (-700, -450)),
                                      ("Emphysema", (-1100, -950))])
def test_textural_lung_lesions_scale_with_the_lung_on_every_axis(name, hu):
    """On thick-slice grids a lesion sized in millimetres was a one-slice disc; sized against the
    lung it covers the same share of the lung's height whatever the slice thickness."""
    from mv3dtk.data import phantom
    from mv3dtk.data.phantom import Finding

    extents = []
    for shape, spacing in (((64, 64, 32), (1.5, 1.5, 6.0)), ((64, 64, 64), (1.5, 1.5, 3.0))):
        grid = phantom.make_grid(shape, spacing)
        anatomy = phantom.Anatomy("M", 1.0, 1.0, 0.0, 0.0)
        plan = {name: Finding(name, side="right", lobe="upper" if name == "Emphysema" else "lower",
                              severity="mild")}
        base = None
        for found in ({}, plan):
            cv, f = phantom.draw_labels(grid, anatomy, found, np.random.default_rng(0))
            phantom.draw_hu(cv, f, np.random.default_rng(1))
            lung = np.isin(cv.lab, phantom.LUNG)
            inside = lung & (cv.hu >= hu[0]) & (cv.hu <= hu[1])
            if base is None:
                base = inside
        lesion = inside & ~base  # (W, H, D) voxels the finding added
        assert lesion.sum() > 0.004 * lung.sum(), (name, shape, int(lesion.sum()))
        parts, _ = ndimage.label(lesion)
        tallest = max(sl[2].stop - sl[2].start for sl in ndimage.find_objects(parts))
        extents.append(tallest / shape[2])  # the tallest patch's share of the scan's height
    assert min(extents) >= 0.08, extents  # >= 3 slices of 32, not a one-slice disc
    assert extents[0] == pytest.approx(extents[1], rel=0.5)
