"""HU auto-detection through the real `mv3d prep` on real NIfTI files: the cases that fool a "1st
percentile above -500 means raw" rule (raw-stored volumes padded with -1024 or -2000, HU crops with
almost no air), files whose header scaling already gave HU, and every forced or doubtful decision
recorded in prep/volumes.parquet (`hu_rescaled`, `warning`) and warned about on stderr."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from helpers import run_mv3d
from mv3dtk.data import ctrate
from mv3dtk.data.synth import make_synthetic_dataset

PREP = ["--size", "24", "48", "48", "--spacing", "3", "1.5", "1.5"]
CROP_AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])  # (W, H, D) stored, 1.5 x 1.5 x 3 mm: the prep grid


def _crop(rng: np.random.Generator, fat: bool) -> np.ndarray:
    """A tight abdominal/cardiac HU crop (W, H, D) = (48, 48, 24): soft tissue 0..100 HU, a spine
    (bone), a gas bubble of 36 voxels (0.07 %), and a 2-voxel fat rim if ``fat``."""
    hu = np.clip(rng.normal(45, 15, (48, 48, 24)), 0, 100)
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    spine = (x - 24) ** 2 + (y - 38) ** 2 <= 16  # (W, H), ~2 % of the area
    hu[spine] = rng.uniform(300, 1200, (int(spine.sum()), 24))
    if fat:
        rim = np.zeros((48, 48), bool)
        rim[:2], rim[-2:], rim[:, :2], rim[:, -2:] = True, True, True, True
        hu[rim] = rng.normal(-100, 15, (int(rim.sum()), 24))
    hu[20:23, 10:13, 10:14] = rng.normal(-1000, 15, (3, 3, 4))  # 36 voxels of gas
    return np.rint(hu).astype(np.int16)


def _save(path: Path, arr: np.ndarray, affine: np.ndarray, slope_inter=None) -> str:
    img = nib.Nifti1Image(arr, affine)
    if slope_inter:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, path)
    return path.name


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """One CSV source (rescale 1 / -1024 for every row, as CT-RATE's metadata says) of:
    hu_chest (HU, -1024 outside the field of view), its raw (HU + 1024) copies padded with 0, -1024
    and -2000 in raw units and the HU copies of the last two (padding -2048 / -3024 HU), the HU crops
    with and without fat and the raw copy of the fatty one, and header_scaled (raw voxels whose NIfTI scl_slope/scl_inter = 1/-1024 give HU on reading)."""
    root = tmp_path_factory.mktemp("hu")
    synth = make_synthetic_dataset(root / "synth", n_train=1, n_valid=1, shape=(24, 64, 64), seed=3,
                                   fine_anatomies=False).root
    img = nib.load(synth / ctrate.volume_relpath("train_1_a_1"))
    hu = np.asanyarray(img.dataobj).astype(np.int16)  # (W, H, D), CT-RATE v2 style
    fov = hu == -1024
    assert 0.15 < fov.mean() < 0.3 and (hu < -900).mean() > 0.3  # a real fill outside the FOV, and air
    src = root / "src"
    src.mkdir()
    files = {"hu_chest": _save(src / "hu_chest.nii.gz", hu, img.affine)}
    for pad in (0, -1024, -2000):  # the raw copies, and HU copies with their padding (pad - 1024 HU)
        raw = hu + np.int16(1024)
        raw[fov] = pad
        files[f"raw_pad{-pad}"] = _save(src / f"raw_pad{-pad}.nii.gz", raw, img.affine)
        if pad:
            files[f"hu_chest_pad{1024 - pad}"] = _save(src / f"hu_chest_pad{1024 - pad}.nii.gz", raw - np.int16(1024),
                                                       img.affine)
    rng = np.random.default_rng(0)
    crop = _crop(rng, fat=True)
    assert (crop < -500).mean() < 0.005 and np.percentile(crop, 1) > -500  # the old rule calls it raw
    files["hu_crop"] = _save(src / "hu_crop.nii.gz", crop, CROP_AFFINE)
    files["hu_crop_nofat"] = _save(src / "hu_crop_nofat.nii.gz", _crop(rng, fat=False), CROP_AFFINE)
    files["raw_crop"] = _save(src / "raw_crop.nii.gz", crop + np.int16(1024), CROP_AFFINE)
    files["header_scaled"] = _save(src / "header_scaled.nii.gz", hu + np.int16(1024), img.affine, (1.0, -1024.0))
    assert nib.load(src / "header_scaled.nii.gz").dataobj.inter == -1024.0
    with open(src / "volumes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["volume_id", "image", "report", "rescale_slope", "rescale_intercept"])
        w.writeheader()
        w.writerows({"volume_id": vid, "image": name, "report": "A volume.", "rescale_slope": 1,
                     "rescale_intercept": -1024} for vid, name in files.items())
    return src / "volumes.csv"


def _prep(root: Path, source, *args):
    proc = run_mv3d("-P", str(root), "prep", str(source), *PREP, *args)
    rows = {r["volume_id"]: r for r in pl.read_parquet(root / "prep/volumes.parquet").iter_rows(named=True)}
    return proc, rows


def _vol(root: Path, row: dict) -> np.ndarray:
    return np.load(root / row["image_path"]).astype(np.float32)


def test_auto_decides_padded_raw_volumes_and_air_poor_crops_right(source, tmp_path):
    root = tmp_path / "p"
    proc, rows = _prep(root, source)
    assert {v: r["hu_rescaled"] for v, r in rows.items()} == {
        "hu_chest": False, "hu_chest_pad2048": False, "hu_chest_pad3024": False,
        "raw_pad0": True, "raw_pad1024": True, "raw_pad2000": True,
        "hu_crop": False, "hu_crop_nofat": False, "raw_crop": True, "header_scaled": False}
    chest = _vol(root, rows["hu_chest"])
    assert (chest == -1).mean() > 0.2 and (chest > -0.2).mean() > 0.1  # air and tissue where they belong
    for vid in ("raw_pad0", "header_scaled"):  # the same HU, the same padding: the HU chest exactly
        np.testing.assert_array_equal(_vol(root, rows[vid]), chest, err_msg=vid)
    for raw, hu in (("raw_pad1024", "hu_chest_pad2048"), ("raw_pad2000", "hu_chest_pad3024")):
        np.testing.assert_array_equal(_vol(root, rows[raw]), _vol(root, rows[hu]), err_msg=raw)
    crop = _vol(root, rows["hu_crop"])
    assert np.median(crop) == pytest.approx(0.045, abs=0.01)  # soft tissue at ~45 HU, not rescaled to -979
    np.testing.assert_array_equal(_vol(root, rows["raw_crop"]), crop)
    assert np.median(_vol(root, rows["hu_crop_nofat"])) == pytest.approx(0.045, abs=0.01)
    # a sure call is silent; the crop with neither air nor fat is decided on weak evidence, and says so
    assert {v: r["warning"] for v, r in rows.items() if v != "hu_crop_nofat"} == dict.fromkeys(set(rows) - {
        "hu_crop_nofat"})
    warning = rows["hu_crop_nofat"]["warning"]
    assert "hu_crop_nofat.nii.gz: HU taken as stored from weak evidence (neither air nor fat" in warning
    assert "use --hu-source raw" in warning and warning in proc.stderr


def test_a_forced_double_rescale_is_recorded_and_warned_about(source, tmp_path):
    root = tmp_path / "p"
    proc, rows = _prep(root, source, "--hu-source", "raw")
    assert all(r["hu_rescaled"] for r in rows.values())
    for vid in ("hu_chest", "hu_crop", "hu_crop_nofat", "header_scaled"):  # HU already: rescaled twice
        w = rows[vid]["warning"]
        assert w and f"{vid}.nii.gz: --hu-source raw applied the rescale (slope 1, intercept -1024) to voxels that " \
                     "look like HU already" in w, (vid, w)
        assert "a double rescale (CT-CLIP#50)" in w and "use --hu-source auto or fixed" in w
        assert w.split(" (CT-CLIP#50)")[0] in proc.stderr
    header = rows["header_scaled"]["warning"]
    assert "the NIfTI header's scaling (scl_slope 1, scl_inter -1024) was applied, and the rescale" in header
    assert "header_scaled.nii.gz: the NIfTI header's scaling" in proc.stderr
    for vid in ("raw_pad0", "raw_pad1024", "raw_pad2000", "raw_crop"):  # really raw: nothing to warn about
        assert rows[vid]["warning"] is None, vid
    assert (_vol(root, rows["hu_chest"]) == -1).mean() > 0.9  # what was written is the double rescale


def test_hu_forced_on_raw_voxels_is_warned_about(source, tmp_path):
    root = tmp_path / "p"
    proc, rows = _prep(root, source, "--hu-source", "fixed")
    assert not any(r["hu_rescaled"] for r in rows.values())
    for vid in ("raw_pad0", "raw_pad1024", "raw_pad2000", "raw_crop"):
        w = rows[vid]["warning"]
        assert w and f"{vid}.nii.gz: --hu-source fixed kept the voxels as HU, but they look raw" in w, (vid, w)
        assert "use --hu-source raw" in w and w in proc.stderr
    for vid in ("hu_chest", "hu_crop", "hu_crop_nofat", "header_scaled"):
        assert rows[vid]["warning"] is None, vid


def test_raw_voxels_in_a_fixed_folder_are_kept_and_warned_about(tmp_path):
    """CT-RATE v2 folders (*_fixed) are taken as HU without looking; raw voxels there are flagged."""
    data = make_synthetic_dataset(tmp_path / "raw", n_train=1, n_valid=1, shape=(24, 64, 64), seed=4, hu="raw",
                                  fine_anatomies=False).root
    shutil.move(data / "dataset/valid", data / "dataset/valid_fixed")
    proc, rows = _prep(tmp_path / "p", data)
    assert rows["train_1_a_1"]["hu_rescaled"] is True and rows["train_1_a_1"]["warning"] is None
    valid = [r for v, r in rows.items() if v.startswith("valid_")]
    assert valid and all(r["hu_rescaled"] is False for r in valid)
    for r in valid:
        assert "--hu-source auto (a *_fixed or RadGenome folder: known HU) kept the voxels as HU, but they look " \
               "raw" in r["warning"] and r["warning"] in proc.stderr


@pytest.mark.parametrize("pad", [0, -1024, -2000, -32768])
def test_guess_hu_sets_a_constant_fill_aside(pad):
    rng = np.random.default_rng(1)
    body = np.rint(rng.normal(40, 20, (40, 40, 20))).astype(np.int16)  # soft tissue, HU
    body[:, :8] = rng.normal(-100, 10, (40, 8, 20))  # fat
    raw = body + np.int16(1024)
    for arr, is_raw in ((body, False), (raw, True)) if pad < -1000 else ((raw, True),):  # HU is not padded with 0
        arr = arr.copy()
        arr[:10] = pad  # 25 % padding
        g = ctrate.guess_hu(arr)
        assert (g.raw, g.sure) == (is_raw, True), (pad, is_raw, g)
        assert ctrate.needs_rescale(arr) is is_raw
        assert f"a fill of {pad} in 25% of the voxels set aside" in g.why
    assert ctrate.needs_rescale(body, "raw") is True and ctrate.needs_rescale(raw, "fixed") is False
    with pytest.raises(ValueError, match="hu_source must be auto, raw or fixed, not 'v2'"):
        ctrate.needs_rescale(body, "v2")
