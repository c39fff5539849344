"""`mv3d prep`: readers, geometry (orientation, spacing), HU handling, resume, shards, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from helpers import run_mv3d
from mv3dtk.data import ctrate
from mv3dtk.data.ingest import table_schema
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.fs import TMP_PREFIX

SMALL = ["--size", "32", "48", "48", "--spacing", "3", "1.5", "1.5"]  # synth (32,64,64) at 3x0.75x0.75 mm


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_train=3, n_valid=2, shape=(32, 64, 64), seed=1)
    return root


def _prep(project, *args, check=True):
    return run_mv3d("-P", str(project.root), "prep", *args, check=check)


def _table(project) -> pl.DataFrame:
    return pl.read_parquet(project.root / "prep" / "volumes.parquet")


def _outputs(project) -> dict[str, bytes]:
    prep = project.root / "prep"
    return {str(p.relative_to(prep)): p.read_bytes() for d in ("volumes", "masks") for p in sorted((prep / d).glob("*.npy"))}


def _save(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), path)
    return path


def _csv_source(folder: Path, rows: list[dict]) -> Path:
    path = folder / "volumes.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return path


# -- the happy path ------------------------------------------------------------------------------

def test_prep_writes_the_design_outputs(synth, mv3d_project):
    _prep(mv3d_project, str(synth), *SMALL)
    df = _table(mv3d_project)
    assert df.schema == pl.Schema(table_schema())
    names = [r["VolumeName"][:-7] for s in ctrate.SPLITS for r in ctrate.read_csv_rows(synth / ctrate.reports_csv(s))]
    assert sorted(df["volume_id"]) == sorted(names)
    assert set(df["status"]) == {"ok"}
    labels = {r["VolumeName"][:-7]: r for s in ctrate.SPLITS for r in ctrate.read_csv_rows(synth / ctrate.labels_csv(s))}
    reports = {r["VolumeName"][:-7]: r for s in ctrate.SPLITS for r in ctrate.read_csv_rows(synth / ctrate.reports_csv(s))}
    for row in df.iter_rows(named=True):
        vid = row["volume_id"]
        assert row["split"] == vid.split("_")[0] and row["patient_id"] == vid.split("_")[1]
        assert all(row[c] == int(labels[vid][c]) for c in ctrate.ABNORMALITIES)
        assert row["findings"] == reports[vid]["Findings_EN"]
        vol = np.load(mv3d_project.root / row["image_path"])
        assert vol.dtype == np.float16 and vol.shape == (32, 48, 48)
        assert vol.min() >= -1 and vol.max() <= 1 and (vol == -1).any()
        mask = np.load(mv3d_project.root / row["mask_path"])
        assert mask.dtype == np.uint16 and mask.shape == vol.shape and mask.max() < 2 ** len(ctrate.REGIONS)
        assert row["source_spacing"] == [3.0, 0.75, 0.75] and row["source_shape"] == [32, 64, 64]
    assert json.loads((mv3d_project.root / "prep/regions.json").read_text()) == list(ctrate.REGIONS)
    texts = pl.read_parquet(mv3d_project.root / "prep/region_texts.parquet")
    assert texts.columns == ["volume_id", "region", "anatomy", "sentence"]
    assert set(texts["region"].drop_nulls()) <= set(ctrate.REGIONS) and texts.height > 10
    assert set(mv3d_project.manifest()["artifacts"]) == {"prep.volumes", "prep.masks", "prep.manifest",
                                                        "prep.region_texts", "prep.regions"}


def test_masks_follow_anatomy_in_the_documented_convention(synth, mv3d_project):
    """D inferior->superior, H anterior->posterior, W patient right->left (axcodes S, P, L)."""
    _prep(mv3d_project, str(synth), *SMALL, "--limit", "2")
    row = _table(mv3d_project).row(0, named=True)
    mask = np.load(mv3d_project.root / row["mask_path"])
    bit = {r: np.uint16(1 << k) for k, r in enumerate(ctrate.REGIONS)}
    centre = lambda region: np.argwhere(mask & bit[region]).mean(0)  # noqa: E731  (D, H, W)
    body = np.argwhere(mask > 0).mean(0)
    assert centre("heart")[2] > body[2] + 1  # heart left of the midline
    assert centre("lung")[0] > centre("abdomen")[0] + 3  # lungs above the abdomen
    assert centre("bone")[1] > centre("heart")[1]  # spine behind the heart
    vol = np.load(mv3d_project.root / row["image_path"]).astype(np.float32)
    assert np.median(vol[(mask & bit["lung"]) > 0]) < -0.7  # lungs are ~-850 HU: image and mask aligned


@pytest.mark.parametrize("affine_kind", ["LPS-stored", "RAS-stored", "sagittal-stored"])
def test_a_marker_lands_on_the_documented_side(tmp_path, mv3d_project, affine_kind):
    """A cube drawn at the patient's left-anterior-superior corner ends up at high D, low H, high W,
    whatever order and direction the file stores its voxels in."""
    n = 40
    world = np.zeros((n, n, n), np.int16) - 1000  # indexed (R->L, A->P, I->S) = LPS index space
    world[28:36, 4:12, 28:36] = 500  # patient left, anterior, superior
    if affine_kind == "LPS-stored":
        arr, aff = world, np.diag([-1.0, -1.0, 1.0, 1.0])
    elif affine_kind == "RAS-stored":
        arr, aff = world[::-1, ::-1, :], np.diag([1.0, 1.0, 1.0, 1.0])
    else:  # stored as (A->P, I->S, R->L): axes permuted
        arr = world.transpose(1, 2, 0)
        aff = np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    img = _save(tmp_path / "x.nii.gz", np.ascontiguousarray(arr), aff)
    src = _csv_source(tmp_path, [{"image": img.name, "report": "A marker."}])
    _prep(mv3d_project, str(src), "--size", "40", "40", "40", "--spacing", "1", "1", "1")
    vol = np.load(mv3d_project.root / "prep/volumes/x.npy")
    d, h, w = np.argwhere(vol > 0.2).mean(0)
    assert d > 25 and h < 15 and w > 25, (d, h, w)


def test_a_sphere_keeps_its_size_in_millimetres(tmp_path, mv3d_project):
    sp = (2.5, 0.8, 0.6)  # (z, y, x) mm
    shape = (40, 125, 160)  # (D, H, W) = 100 x 100 x 96 mm
    z, y, x = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, sp)], indexing="ij")
    ball = np.where(z ** 2 + y ** 2 + x ** 2 <= 20.0 ** 2, 400, -1000).astype(np.int16)  # radius 20 mm
    img = _save(tmp_path / "ball.nii.gz", ball.transpose(2, 1, 0).copy(), np.diag([-sp[2], -sp[1], sp[0], 1]))
    src = _csv_source(tmp_path, [{"image": img.name, "report": "A ball."}])
    _prep(mv3d_project, str(src), "--size", "48", "120", "120", "--spacing", "3", "1", "1")
    inside = np.argwhere(np.load(mv3d_project.root / "prep/volumes/ball.npy") > -0.3)
    extent = inside.max(0) - inside.min(0) + 1  # voxels along (D, H, W)
    np.testing.assert_allclose(extent, [40 / 3, 40, 40], atol=1.5)


def test_csv_table_with_spacing_and_rescale_columns(tmp_path, mv3d_project):
    arr = np.full((20, 20, 20), 24, np.int16)  # raw: HU + 1024 -> -1000 HU air
    arr[5:15, 5:15, 5:15] = 1024 + 40  # 40 HU soft tissue
    img = _save(tmp_path / "raw.nii.gz", arr, np.eye(4))
    src = _csv_source(tmp_path, [{"image": img.name, "findings": "Soft tissue block.", "spacing_z": 2,
                                  "spacing_y": 2, "spacing_x": 2, "rescale_slope": 1, "rescale_intercept": -1024,
                                  "Cardiomegaly": 1, "split": "valid", "volume_id": "case-001"}])
    _prep(mv3d_project, str(src), "--size", "40", "40", "40", "--spacing", "1", "1", "1", "--hu-source", "raw")
    row = _table(mv3d_project).row(0, named=True)
    assert (row["volume_id"], row["split"], row["Cardiomegaly"], row["Emphysema"]) == ("case-001", "valid", 1, None)
    assert row["hu_rescaled"] is True and row["source_spacing"] == [2.0, 2.0, 2.0]
    vol = np.load(mv3d_project.root / row["image_path"]).astype(np.float32)
    assert vol[20, 20, 20] == pytest.approx(0.04, abs=2e-3) and vol[2, 2, 2] == pytest.approx(-1.0, abs=2e-3)


# -- HU ------------------------------------------------------------------------------------------

def test_raw_and_fixed_sources_give_identical_volumes(tmp_path, mv3d_project):
    """v1 (HU+1024) and v2 (HU) with the same CSV intercept: auto rescales only the first."""
    kw = dict(n_train=1, n_valid=1, shape=(24, 48, 48), seed=5)
    make_synthetic_dataset(tmp_path / "raw", hu="raw", **kw)
    make_synthetic_dataset(tmp_path / "fixed", hu="fixed", **kw)
    shutil.move(tmp_path / "fixed/dataset/valid", tmp_path / "fixed/dataset/valid_fixed")  # CT-RATE v2 folder
    other = type(mv3d_project).init(tmp_path / "p2")
    _prep(mv3d_project, str(tmp_path / "raw"), *SMALL)
    _prep(other, str(tmp_path / "fixed"), *SMALL)
    a, b = _table(mv3d_project), _table(other)
    assert a["hu_rescaled"].to_list() == [True] * a.height and b["hu_rescaled"].to_list() == [False] * b.height
    assert _outputs(mv3d_project) == _outputs(other)
    _prep(other, str(tmp_path / "fixed"), *SMALL, "--hu-source", "raw")  # forcing the double rescale
    vol = np.load(other.root / "prep/volumes/valid_1_a_1.npy")
    assert (vol == -1).mean() > 0.9  # everything below -1000 HU: what CT-CLIP#50 users got


# -- resume, kill, shards, workers ---------------------------------------------------------------

def test_rerun_skips_done_volumes_and_redoes_changed_ones(synth, mv3d_project):
    _prep(mv3d_project, str(synth), *SMALL)
    vol = mv3d_project.root / "prep/volumes/train_1_a_1.npy"
    before = vol.stat().st_mtime_ns
    again = _prep(mv3d_project, str(synth), *SMALL)
    assert "(0 processed" in again.stderr and vol.stat().st_mtime_ns == before
    src = synth / ctrate.volume_relpath("train_2_a_1")
    src.touch()
    again = _prep(mv3d_project, str(synth), *SMALL)
    assert "(1 processed" in again.stderr and vol.stat().st_mtime_ns == before
    changed = _prep(mv3d_project, str(synth), "--size", "32", "40", "40", "--spacing", "3", "1.5", "1.5")
    assert "0 already done" in changed.stderr and np.load(vol).shape == (32, 40, 40)


def _records(project) -> int:
    """Volumes committed so far: prep writes ``prep/records/<id>.json`` last, once a volume is done."""
    folder = project.root / "prep" / "records"
    return sum(p.suffix == ".json" and not p.name.startswith(TMP_PREFIX) for p in folder.glob("*")) \
        if folder.is_dir() else 0


@pytest.mark.timeout(240)
def test_sigkill_mid_run_then_rerun_gives_a_complete_correct_project(tmp_path, mv3d_project):
    """Killed twice while volumes are being written (after ~1/4, then ~3/4 of them), each time with
    the work really partial, the rerun resumes and gives the bytes of an uninterrupted run."""
    data = make_synthetic_dataset(tmp_path / "data", n_train=10, n_valid=2, shape=(32, 64, 64), seed=1,
                                  fine_anatomies=False).root
    big = ["--size", "64", "128", "128", "--spacing", "1.5", "0.375", "0.375", "--workers", "1"]  # ~0.2 s a volume
    clean = type(mv3d_project).init(tmp_path / "clean")
    _prep(clean, str(data), *big)
    n = _table(clean).height
    assert n >= 12
    exe = [sys.executable, "-m", "mv3dtk", "-P", str(mv3d_project.root), "prep", str(data), *big]
    done = 0
    for target in (n // 4, 3 * n // 4):
        log = tmp_path / f"killed-at-{target}.log"
        with open(log, "w") as err:
            p = subprocess.Popen(exe, stderr=err)
            deadline = time.monotonic() + 120
            while _records(mv3d_project) < target and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            p.kill()
            p.wait()
        assert p.returncode == -signal.SIGKILL, log.read_text()  # killed, not exited
        assert f"{done} already done, {n - done} to process" in log.read_text()  # resumed the last kill's work
        done = _records(mv3d_project)
        assert target <= done < n, (target, done, n)  # the kill landed mid-run
        assert not (mv3d_project.root / "prep/volumes.parquet").exists()
    rerun = _prep(mv3d_project, str(data), *big)
    assert f"{done} already done, {n - done} to process" in rerun.stderr
    assert _outputs(mv3d_project) == _outputs(clean)
    assert _table(mv3d_project).equals(_table(clean))
    leftovers = [p for p in (mv3d_project.root / "prep").rglob(f"{TMP_PREFIX}*")]
    assert leftovers == []


def test_shards_write_disjoint_parts_and_a_plain_run_merges_them(tmp_path, synth, mv3d_project):
    exe = [sys.executable, "-m", "mv3dtk", "-P", str(mv3d_project.root), "prep", str(synth), *SMALL]
    procs = [subprocess.Popen([*exe, "--shard", f"{i}/3"], stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert not (mv3d_project.root / "prep/volumes.parquet").exists()
    status = json.loads(run_mv3d("-P", str(mv3d_project.root), "status", "--json").stdout)
    assert {r["stage"]: r["status"] for r in status}["prep"] == "partial"
    done = sorted(p.name for p in (mv3d_project.root / "prep/records").glob("*.json"))
    n_total = len(_outputs_names(synth))
    assert len(done) == n_total  # together the shards cover everything, once
    merged = _prep(mv3d_project, str(synth), *SMALL)
    assert "(0 processed" in merged.stderr and f"{n_total} already done" in merged.stderr
    clean = type(mv3d_project).init(tmp_path / "clean")
    _prep(clean, str(synth), *SMALL, "--workers", "2")  # also: 2 workers = same bytes as 1
    assert _outputs(mv3d_project) == _outputs(clean)
    assert _table(mv3d_project).equals(_table(clean))


def _outputs_names(root: Path) -> list[str]:
    return [r["VolumeName"] for s in ctrate.SPLITS for r in ctrate.read_csv_rows(root / ctrate.reports_csv(s))]


def test_bad_shard_spec_is_a_clear_error(synth, mv3d_project):
    proc = _prep(mv3d_project, str(synth), "--shard", "3/3", check=False)
    assert proc.returncode == 1 and "numbered from 0" in proc.stderr


# -- bad input -----------------------------------------------------------------------------------

@pytest.fixture
def broken(tmp_path) -> Path:
    """A synthetic CT-RATE copy with one of every kind of problem."""
    root = tmp_path / "broken"
    make_synthetic_dataset(root, n_train=9, n_valid=1, shape=(24, 48, 48), seed=2)
    vol = lambda name: root / ctrate.volume_relpath(name)  # noqa: E731
    data = vol("train_1_a_1").read_bytes()
    vol("train_1_a_1").write_bytes(data[: len(data) // 2])  # truncated .nii.gz
    vol("train_1_a_2").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 10)  # corrupt gzip
    aff = np.diag([-0.75, -0.75, 3.0, 1.0])
    _save(vol("train_1_b_1"), np.zeros((48, 48, 1), np.int16), aff)  # 2-D
    _save(vol("train_2_a_1"), np.zeros((48, 48, 24, 2), np.int16), aff)  # 4-D
    nan = np.zeros((48, 48, 24), np.float32)
    nan[3, 3, 3] = np.nan
    _save(vol("train_3_a_1"), nan, aff)  # NaN voxel
    seg = root / ctrate.region_mask_dir("train") / "seg_train_3_a_2"
    _save(seg / "heart.nii.gz", np.zeros((40, 48, 24), np.uint8), aff)  # mask shape differs
    seg = root / ctrate.region_mask_dir("train") / "seg_train_4_a_1"
    _save(seg / "lung.nii.gz", np.zeros((48, 48, 24), np.uint8), np.diag([-0.75, -0.75, 2.0, 1.0]))  # affine
    extra = root / ctrate.volume_relpath("train_9_a_1")  # a volume with no report row
    extra.parent.mkdir(parents=True)
    shutil.copy(vol("train_5_a_1"), extra)
    reports = root / ctrate.reports_csv("train")
    rows = ctrate.read_csv_rows(reports)
    rows.append({**rows[0], "VolumeName": "train_99_a_1.nii.gz"})  # a report row with no volume
    for r in rows:
        if r["VolumeName"] == "train_5_a_1.nii.gz":
            r["Findings_EN"] = "Not given."  # empty findings (the impressions remain)
        if r["VolumeName"] == "train_5_b_1.nii.gz":
            r["Findings_EN"] = r["Impressions_EN"] = "Not given."  # no report text at all
    _write_rows(reports, rows)
    labels = root / ctrate.labels_csv("train")
    _write_rows(labels, [{k: v for k, v in r.items() if k != "Emphysema"} for r in ctrate.read_csv_rows(labels)])
    return root


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_bad_volumes_fail_alone_with_a_clear_error(broken, mv3d_project):
    proc = _prep(mv3d_project, str(broken), *SMALL, check=False)
    assert proc.returncode == 1
    assert "10 of " in proc.stderr and "volumes failed" in proc.stderr and "--keep-going" in proc.stderr
    assert "lacks the label columns ['Emphysema']" in proc.stderr
    df = _table(mv3d_project)
    err = {r["volume_id"]: r["error"] or "" for r in df.iter_rows(named=True)}
    expected = {
        "train_1_a_1": "truncated", "train_1_a_2": "cannot decompress", "train_1_b_1": "2-D",
        "train_2_a_1": "expected a 3-D volume", "train_3_a_1": "NaN", "train_3_a_2": "mask shape",
        "train_4_a_1": "mask affine", "train_9_a_1": "no report row", "train_99_a_1": "no volume file",
        "train_5_b_1": "report of train_5_b_1 is empty",
    }
    for vid, words in expected.items():
        assert words in err[vid], (vid, err[vid])
        assert df.filter(pl.col("volume_id") == vid)["status"].item() == "failed"
    ok = df.filter(pl.col("status") == "ok")
    assert set(ok["volume_id"]) == set(err) - set(expected)
    train = ok.filter(pl.col("split") == "train")
    assert train["Emphysema"].null_count() == train.height  # the missing column is null, the others kept
    assert ok["Cardiomegaly"].null_count() == 0 and ok.filter(pl.col("split") == "valid")["Emphysema"].null_count() == 0
    empty = df.filter(pl.col("volume_id") == "train_5_a_1").row(0, named=True)
    assert empty["status"] == "ok" and empty["findings"] is None and "findings section is empty" in empty["warning"]
    rows = json.loads(run_mv3d("-P", str(mv3d_project.root), "status", "--json").stdout)
    assert {r["stage"]: r["status"] for r in rows}["prep"] == "failed"
    keep = _prep(mv3d_project, str(broken), *SMALL, "--keep-going")
    assert "(0 processed" not in keep.stderr  # failed volumes are retried, finished ones skipped
    assert f"{ok.height} already done" in keep.stderr


# -- RadGenome layout ----------------------------------------------------------------------------

def test_radgenome_layout(tmp_path, mv3d_project):
    root = tmp_path / "rg"
    make_synthetic_dataset(root, n_train=2, n_valid=1, shape=(24, 48, 48), seed=4)
    ds = root / "dataset"
    for split in ctrate.SPLITS:  # CT-RATE folders -> RadGenome's train_preprocessed/train_1/train_1a/
        for f in sorted((ds / split).glob("*/*/*_1.nii.gz")):
            _, pid, scan, _ = ctrate.parse_volume_name(f.name)
            dest = ds / f"{split}_preprocessed" / f"{split}_{pid}" / f"{split}_{pid}{scan}" / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(f, dest)
        shutil.rmtree(ds / split)
    shutil.rmtree(ds / "radiology_text_reports")
    _prep(mv3d_project, str(root), *SMALL)
    df = _table(mv3d_project)
    assert set(df["status"]) == {"ok"} and all(v.endswith("_1") for v in df["volume_id"])
    texts = pl.read_parquet(mv3d_project.root / "prep/region_texts.parquet")
    whole = texts.filter(pl.col("anatomy").is_null())
    row = df.row(0, named=True)
    assert row["findings"] == whole.filter(pl.col("volume_id") == row["volume_id"])["sentence"].item()
    assert row["scan_id"] == "a" and row["mask_path"] is not None


def test_unknown_layout_is_explained(tmp_path, mv3d_project):
    (tmp_path / "empty").mkdir()
    proc = _prep(mv3d_project, str(tmp_path / "empty"), check=False)
    assert proc.returncode == 1 and "cannot tell the dataset layout" in proc.stderr and "--layout" in proc.stderr


def test_missing_region_mask_falls_back_to_fine_anatomies(tmp_path, mv3d_project):
    root = tmp_path / "fa"
    make_synthetic_dataset(root, n_train=4, n_valid=1, shape=(24, 48, 48), seed=6)
    texts = [r for r in ctrate.read_csv_rows(root / ctrate.region_texts_csv("train"))
             if r["Anatomy"].startswith("lung/") and r["Anatomy"].rsplit("/", 1)[1] in ("right lung", "left lung")]
    vid = texts[0]["Volumename"][:-7]
    leaves = {r["Anatomy"].rsplit("/", 1)[1] for r in texts if r["Volumename"][:-7] == vid}
    _prep(mv3d_project, str(root), *SMALL)
    lung = np.uint16(1 << ctrate.REGIONS.index("lung"))
    before = (np.load(mv3d_project.root / f"prep/masks/{vid}.npy") & lung) > 0
    (root / ctrate.region_mask_dir("train") / f"seg_{vid}" / "lung.nii.gz").unlink()
    _prep(mv3d_project, str(root), *SMALL)
    after = (np.load(mv3d_project.root / f"prep/masks/{vid}.npy") & lung) > 0
    expected = np.zeros_like(before)
    for leaf in leaves:  # the fine masks, on the prep grid, by hand
        img = nib.load(root / ctrate.anatomy_mask_dir("train") / f"seg_{vid}" / f"{leaf}.nii.gz")
        from mv3dtk.data.preprocess import orient, plans_for, resample_nearest

        o = orient(np.asanyarray(img.dataobj) > 0, img.affine)
        expected |= resample_nearest(o.array, plans_for(o.array.shape, o.spacing, (3, 1.5, 1.5), (32, 48, 48))) > 0
    assert after.sum() > 0 and np.array_equal(after, expected)
    assert (after & ~before).sum() == 0  # the lobes lie inside the lung region
