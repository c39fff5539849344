"""The export into nnU-Net's raw format (issue #19) and the synthetic TotalSegmentator writer, on real files.

Every expectation is recomputed with numpy from the source files: the label maps (a later label wins), the overlap
counts, the intensities of both modes (prep's window, or HU with the CT-RATE rescale), and the geometry."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mv3dtk.data.ingest import PrepOptions, process_volume
from mv3dtk.data.preprocess import orient
from mv3dtk.data.sources import read_source
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.data.synth_totalseg import LOBES, META_COLUMNS, STRUCTURES, make_synthetic_totalseg
from mv3dtk.errors import ConfigError, DataError
from mv3dtk.seg.export import export_dataset

SHAPE = (24, 48, 48)  # (D, H, W)
SPACING = (4.0, 2.0, 2.0)  # (z, y, x) mm
N_CASES = 3


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def totalseg(tmp_path_factory) -> Path:
    return make_synthetic_totalseg(tmp_path_factory.mktemp("ts") / "TotalSegmentator", N_CASES, shape=SHAPE,
                                   spacing=SPACING, seed=0).root


@pytest.fixture(scope="module")
def ctrate_raw(tmp_path_factory) -> Path:
    """CT-RATE v1 flavour: voxels are HU + 1024, the metadata CSV says slope 1, intercept -1024."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("ct") / "ctrate", n_train=2, n_valid=1, shape=(16, 32, 32),
                                  spacing=(3.0, 1.5, 1.5), seed=0, hu="raw", fine_anatomies=False).root


@pytest.fixture
def ts_copy(totalseg, tmp_path) -> Path:
    """A private copy of the TotalSegmentator fixture, for tests that add or break files."""
    return Path(shutil.copytree(totalseg, tmp_path / "ts"))


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _mask(root: Path, case: str, name: str) -> np.ndarray:
    return _data(root / case / "segmentations" / f"{name}.nii.gz") > 0


def _reference_map(root: Path, case: str, labels: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """The merged label map and per-label overlap counts, by numpy, straight from the mask files."""
    ref = np.zeros(_data(root / case / "ct.nii.gz").shape, np.uint8)
    overlaps = {}
    for k, name in enumerate(labels, 1):
        m = _mask(root, case, name)
        overlaps[name] = int(np.sum(m & (ref > 0)))
        ref[m] = k
    return ref, overlaps


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip(hu.astype(np.float64), -1000, 1000) / 1000.0


# ---------------------------------------------------------------------------------------------
# The synthetic TotalSegmentator layout
# ---------------------------------------------------------------------------------------------
def test_synth_totalseg_writes_the_real_layout(tmp_path):
    summary = make_synthetic_totalseg(tmp_path / "ts", 10, shape=(16, 32, 32), spacing=(6.0, 3.0, 3.0), seed=0)
    root = summary.root
    cases = [f"s{i:04d}" for i in range(10)]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == cases
    for case in cases:
        ct = nib.load(root / case / "ct.nii.gz")
        assert ct.get_data_dtype() == np.int16 and ct.shape == (32, 32, 16)
        assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
        np.testing.assert_allclose(ct.header.get_zooms(), (3.0, 3.0, 6.0))
        files = sorted(p.name for p in (root / case / "segmentations").iterdir())
        assert files == sorted(f"{s}.nii.gz" for s in STRUCTURES)  # every structure, every case (as the real one)
        for name in ("heart", "lung_lower_lobe_left", "vertebrae_T6"):
            m = nib.load(root / case / "segmentations" / f"{name}.nii.gz")
            assert m.get_data_dtype() == np.uint8 and m.shape == ct.shape
            np.testing.assert_array_equal(m.affine, ct.affine)
            assert set(np.unique(np.asarray(m.dataobj))) <= {0, 1}
    raw = (root / "meta.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM, as TotalSegmentator's
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter=";"))
    assert tuple(rows[0]) == META_COLUMNS and [r["image_id"] for r in rows] == cases
    assert {r["image_id"]: r["split"] for r in rows} == summary.splits
    assert [r["split"] for r in rows] == ["train"] * 8 + ["val", "test"]
    assert {r["gender"] for r in rows} <= {"m", "f"}


def test_synth_totalseg_is_deterministic_and_stable_when_cases_are_added(tmp_path):
    kw = dict(shape=(16, 32, 32), spacing=(6.0, 3.0, 3.0))
    a = make_synthetic_totalseg(tmp_path / "a", 2, seed=3, **kw).root
    b = make_synthetic_totalseg(tmp_path / "b", 3, seed=3, **kw).root
    c = make_synthetic_totalseg(tmp_path / "c", 2, seed=4, **kw).root
    ta, tb = _tree(a), _tree(b)
    assert {k: v for k, v in tb.items() if k.startswith(("s0000/", "s0001/"))} == \
        {k: v for k, v in ta.items() if k != "meta.csv"}
    assert ta["s0000/ct.nii.gz"] != _tree(c)["s0000/ct.nii.gz"]
    assert not list(a.rglob(".tmp-*"))


def test_synth_totalseg_masks_follow_the_image_and_vary_between_cases(totalseg):
    lungs, centres = [], []
    for i in range(N_CASES):
        case = f"s{i:04d}"
        ct = _data(totalseg / case / "ct.nii.gz").astype(float)
        lobes = np.stack([_mask(totalseg, case, x) for x in LOBES])
        assert lobes.sum(0).max() == 1  # the lobes partition the lungs
        lung = lobes.any(0)
        assert lobes.reshape(5, -1).sum(1).min() > 0
        assert ct[lung].mean() < -600
        for organ in ("heart", "liver"):
            assert -100 < ct[_mask(totalseg, case, organ)].mean() < 150, organ
        bone = np.any([_mask(totalseg, case, f"vertebrae_T{k}") for k in range(1, 13)], axis=0)
        assert ct[bone].mean() > 200
        lungs.append(lung)
        centres.append(np.argwhere(_mask(totalseg, case, "heart")).mean(0))
    dice = [2 * np.sum(lungs[0] & m) / (lungs[0].sum() + m.sum()) for m in lungs[1:]]
    assert max(dice) < 0.9, dice  # a fixed mask would not fit every case: the network must look at the image
    assert max(np.abs(c - centres[0]).max() for c in centres[1:]) > 1.0  # the heart moves by over a voxel


# ---------------------------------------------------------------------------------------------
# Export: files, dataset.json, values
# ---------------------------------------------------------------------------------------------
def test_export_totalseg_files_dataset_json_and_mv3d_intensity(totalseg, tmp_path):
    calls = []
    report = export_dataset(totalseg, tmp_path / "nnUNet_raw", progress=lambda d, t: calls.append((d, t)))
    out = tmp_path / "nnUNet_raw" / "Dataset501_TotalSegmentator"
    cases = [f"s{i:04d}" for i in range(N_CASES)]
    assert report.dataset_dir == out and report.cases == cases and not report.skipped
    assert report.labels == sorted(STRUCTURES) and calls == [(i, N_CASES) for i in range(1, N_CASES + 1)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "noNorm"}
    assert meta["labels"] == {"background": 0, **{x: k for k, x in enumerate(sorted(STRUCTURES), 1)}}
    assert list(meta["labels"]) == ["background", *sorted(STRUCTURES)]
    assert meta["numTraining"] == N_CASES and meta["file_ending"] == ".nii.gz"
    assert meta["mv3d"]["layout"] == "totalseg" and meta["mv3d"]["intensity"] == "mv3d"
    assert meta["mv3d"]["source"] == str(totalseg) and meta["mv3d"]["labels"] == sorted(STRUCTURES)
    assert meta["mv3d"]["overlaps"] == report.overlaps and meta["mv3d"]["hu_window"] == [-1000.0, 1000.0]
    assert report.case_split == {c: "train" for c in cases}
    for case in cases:
        src = nib.load(totalseg / case / "ct.nii.gz")
        img, lab = nib.load(out / "imagesTr" / f"{case}_0000.nii.gz"), nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert img.shape == lab.shape == src.shape
        np.testing.assert_array_equal(img.affine, src.affine)
        np.testing.assert_array_equal(lab.affine, src.affine)
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(np.asarray(img.dataobj), _window(np.asarray(src.dataobj)), rtol=0, atol=1e-6)
        ref, _ = _reference_map(totalseg, case, sorted(STRUCTURES))
        np.testing.assert_array_equal(np.asarray(lab.dataobj), ref)


def test_export_ctrate_nnunet_intensity_applies_the_metadata_rescale(ctrate_raw, tmp_path):
    report = export_dataset(ctrate_raw, tmp_path / "raw", labels=["lung", "heart"], intensity="nnunet",
                            dataset_id=7, name="Chest")
    out = tmp_path / "raw" / "Dataset007_Chest"
    vols = {v.volume_id: v for v in read_source(ctrate_raw).volumes}
    assert report.cases == sorted(vols) and report.layout == "ctrate"
    assert report.case_split == {c: c.split("_")[0] for c in vols}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "lung": 1, "heart": 2}
    assert "hu_window" not in meta["mv3d"]
    for case, v in vols.items():
        img = nib.load(out / "imagesTr" / f"{case}_0000.nii.gz")
        stored = np.asarray(nib.load(v.image_path).dataobj)
        assert stored.min() >= 0  # raw: HU + 1024 on disk
        assert img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asarray(img.dataobj), stored.astype(np.int32) - 1024)
        lab = np.asarray(nib.load(out / "labelsTr" / f"{case}.nii.gz").dataobj)
        lung, heart = (np.asarray(nib.load(v.masks[r][0]).dataobj) > 0 for r in ("lung", "heart"))
        ref = np.zeros(lab.shape, np.uint8)
        ref[lung], ref[heart] = 1, 2
        np.testing.assert_array_equal(lab, ref)


def test_export_mv3d_intensity_equals_prep(ctrate_raw, tmp_path):
    """The mv3d image, put in prep's (D, H, W) order, is prep's volume (float16) on the source grid."""
    report = export_dataset(ctrate_raw, tmp_path / "raw", labels=["lung"])
    out = report.dataset_dir
    for v in read_source(ctrate_raw).volumes:
        src = nib.load(v.image_path)
        stored = np.asarray(src.dataobj)
        ours = np.asarray(nib.load(out / "imagesTr" / f"{v.volume_id}_0000.nii.gz").dataobj)
        np.testing.assert_allclose(ours, _window(stored.astype(np.int32) - 1024), rtol=0, atol=1e-6)
        opts = PrepOptions(spacing=v.spacing, size=tuple(stored.shape[::-1]))
        rec = process_volume(v, tmp_path / "proj" / "prep", opts)
        assert rec["status"] == "ok" and rec["hu_rescaled"], rec
        prep = np.load(tmp_path / "proj" / rec["image_path"])  # (D, H, W) float16
        np.testing.assert_array_equal(orient(ours, src.affine).array.astype(np.float16), prep)


# ---------------------------------------------------------------------------------------------
# Export: merging, errors, atomicity
# ---------------------------------------------------------------------------------------------
def _add_box(root: Path, case: str) -> np.ndarray:
    """A mask over the heart and its surroundings, so it overlaps heart, lungs and aorta."""
    heart = _mask(root, case, "heart")
    lo, hi = np.argwhere(heart).min(0), np.argwhere(heart).max(0)
    box = np.zeros(heart.shape, np.uint8)
    box[max(0, lo[0] - 2):hi[0] + 3, lo[1]:(lo[1] + hi[1]) // 2 + 1, lo[2]:hi[2] + 1] = 1
    ref = nib.load(root / case / "ct.nii.gz")
    nib.save(nib.Nifti1Image(box, ref.affine), root / case / "segmentations" / "box.nii.gz")
    return box > 0


@pytest.mark.parametrize("labels", [["heart", "lung_upper_lobe_left", "aorta", "box"],
                                    ["box", "heart", "lung_upper_lobe_left", "aorta"]])
def test_merge_order_a_later_label_wins_and_overlaps_are_counted(ts_copy, tmp_path, labels):
    for i in range(N_CASES):
        _add_box(ts_copy, f"s{i:04d}")
    report = export_dataset(ts_copy, tmp_path / "raw", labels=labels)
    totals = dict.fromkeys(labels, 0)
    for case in report.cases:
        ref, overlaps = _reference_map(ts_copy, case, labels)
        np.testing.assert_array_equal(_data(report.dataset_dir / "labelsTr" / f"{case}.nii.gz"), ref)
        for k, n in overlaps.items():
            totals[k] += n
    assert report.overlaps == totals
    winner = labels.index("box") == len(labels) - 1
    assert (totals["box"] > 0) == winner and (totals["heart"] > 0) != winner  # the later one takes the voxels
    meta = json.loads((report.dataset_dir / "dataset.json").read_text())
    assert list(meta["labels"]) == ["background", *labels] and meta["mv3d"]["overlaps"] == totals


def test_geometry_mismatch_or_a_bad_file_skips_the_case_and_names_it(ts_copy, tmp_path):
    heart = ts_copy / "s0001" / "segmentations" / "heart.nii.gz"
    img = nib.load(heart)
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), heart)
    (ts_copy / "s0002" / "ct.nii.gz").write_bytes(b"not a nifti")
    report = export_dataset(ts_copy, tmp_path / "raw", labels=["heart", "liver"])
    assert report.cases == ["s0000"] and set(report.skipped) == {"s0001", "s0002"}
    assert "s0001" in report.skipped["s0001"] and str(heart) in report.skipped["s0001"]
    assert "affine" in report.skipped["s0001"]
    assert str(ts_copy / "s0002" / "ct.nii.gz") in report.skipped["s0002"]
    assert sorted(p.name for p in (report.dataset_dir / "labelsTr").iterdir()) == ["s0000.nii.gz"]
    meta = json.loads((report.dataset_dir / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and set(meta["mv3d"]["skipped"]) == {"s0001", "s0002"}


def test_a_shape_mismatch_in_every_case_is_an_error_naming_the_case(ts_copy, tmp_path):
    for i in range(N_CASES):
        path = ts_copy / f"s{i:04d}" / "segmentations" / "liver.nii.gz"
        m = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(m.dataobj)[:-1], m.affine), path)
    with pytest.raises(DataError, match=r"s0000: the mask .*liver\.nii\.gz has shape \(47, 48, 24\)"):
        export_dataset(ts_copy, tmp_path / "raw", labels=["heart", "liver"])
    assert not (tmp_path / "raw" / "Dataset501_TotalSegmentator").exists()
    assert not list((tmp_path / "raw").iterdir())  # no temporary left behind


def test_unknown_or_empty_labels_are_config_errors(ts_copy, tmp_path):
    with pytest.raises(ConfigError, match="kidney_left") as e:
        export_dataset(ts_copy, tmp_path / "raw", labels=["heart", "kidney_left"])
    assert "the labels present are: aorta, esophagus, heart" in str(e.value)
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir())
    for i in range(N_CASES):  # a mask file in every case, empty in all of them
        ref = nib.load(ts_copy / f"s{i:04d}" / "ct.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine),
                 ts_copy / f"s{i:04d}" / "segmentations" / "brain.nii.gz")
    with pytest.raises(ConfigError, match=r"\['brain'\] are empty in every exported case"):
        export_dataset(ts_copy, tmp_path / "raw", labels=["heart", "brain"])
    assert not list((tmp_path / "raw").iterdir())
    report = export_dataset(ts_copy, tmp_path / "raw")  # every label found: the empty one is reported, not fatal
    assert "brain" in report.labels and report.empty_labels == ["brain"]
    with pytest.raises(ConfigError, match="intensity"):
        export_dataset(ts_copy, tmp_path / "raw", intensity="hu")


def test_export_is_atomic_and_a_rerun_replaces_it(totalseg, tmp_path):
    raw = tmp_path / "raw"

    def fail_at(n):
        def progress(done, total):
            if done == n:
                raise RuntimeError("interrupted")
        return progress

    with pytest.raises(RuntimeError, match="interrupted"):
        export_dataset(totalseg, raw, labels=["heart"], progress=fail_at(2))
    assert list(raw.iterdir()) == []  # no Dataset folder, no temporary

    first = export_dataset(totalseg, raw, labels=["heart"]).dataset_dir
    before = _tree(first)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_dataset(totalseg, raw, labels=["liver", "heart"], progress=fail_at(2))
    assert [p.name for p in raw.iterdir()] == [first.name] and _tree(first) == before  # the old one, intact

    again = export_dataset(totalseg, raw, labels=["liver", "heart"]).dataset_dir
    assert again == first and [p.name for p in raw.iterdir()] == [first.name]
    assert set(_tree(again)) == set(before)
    assert json.loads((again / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1, "heart": 2}

    (raw / "Dataset501_Other").mkdir()
    with pytest.raises(ConfigError, match="Dataset501_Other"):
        export_dataset(totalseg, raw, labels=["heart"])


def test_splits_select_cases(tmp_path):
    root = make_synthetic_totalseg(tmp_path / "ts", 10, shape=(16, 32, 32), spacing=(6.0, 3.0, 3.0)).root
    report = export_dataset(root, tmp_path / "raw", labels=["heart"], splits=["val", "test"])
    assert report.cases == ["s0008", "s0009"] and report.case_split == {"s0008": "val", "s0009": "test"}


# ---------------------------------------------------------------------------------------------
# The CLI and nnU-Net's own reader
# ---------------------------------------------------------------------------------------------
def test_cli_synth_totalseg_writes_the_layout(tmp_path, mv3d_cli):
    args = ["--n-train", "2", "--shape", "16", "32", "32", "--spacing", "6", "3", "3", "--seed", "1"]
    res = mv3d_cli(["synth", str(tmp_path / "cli"), "--dataset", "totalseg", *args])
    assert str(tmp_path / "cli") in res.output
    lib = make_synthetic_totalseg(tmp_path / "lib", 2, shape=(16, 32, 32), spacing=(6.0, 3.0, 3.0), seed=1).root
    assert _tree(tmp_path / "cli") == _tree(lib) and "s0001/segmentations/heart.nii.gz" in _tree(lib)


@pytest.mark.nnunet
def test_nnunet_reads_the_export_with_matching_geometry(totalseg, ctrate_raw, tmp_path):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    runs = ((totalseg, {"labels": ["heart", "liver", "aorta"]}), (ctrate_raw, {"intensity": "nnunet"}))
    for dataset_id, (source, kw) in enumerate(runs, 601):
        report = export_dataset(source, tmp_path / "raw", dataset_id=dataset_id, **kw)
        meta = json.loads((report.dataset_dir / "dataset.json").read_text())
        expected = list(meta["labels"].values())
        for case in report.cases:
            image = str(report.dataset_dir / "imagesTr" / f"{case}_0000.nii.gz")
            label = str(report.dataset_dir / "labelsTr" / f"{case}.nii.gz")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert check_cases([image], label, 1, SimpleITKIO)
                assert verify_labels(label, SimpleITKIO, expected)
            assert "mismatch" not in printed.getvalue() and "Error" not in printed.getvalue(), printed.getvalue()
            data, props = SimpleITKIO().read_images([image])  # (1, z, y, x)
            np.testing.assert_array_equal(data[0], _data(Path(image)).transpose(2, 1, 0))
            np.testing.assert_allclose(props["spacing"], nib.load(image).header.get_zooms()[::-1])
