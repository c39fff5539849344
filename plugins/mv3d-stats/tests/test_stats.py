"""Tests of the example plugin, written the way a third-party author would: with the fixtures
that mv3d ships in ``mv3dtk.testing`` (mv3d_project, mv3d_cli, synthetic_ctrate)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from mv3dtk.data import ctrate
from mv3dtk.data.synth import make_synthetic_dataset
from mv3d_stats.compute import HU_EDGES, dataset_stats


def _summary(project):
    with open(project.root / "stats" / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_stats_stage_writes_csv_and_png(mv3d_project, mv3d_cli, synthetic_ctrate):
    mv3d_cli(["stats", str(synthetic_ctrate), "--max-volumes", "3"], project=mv3d_project)
    rows = _summary(mv3d_project)
    # prevalence equals what the labels CSV says, column by column
    labels = ctrate.read_csv_rows(synthetic_ctrate / ctrate.labels_csv("train"))
    got = {r["name"]: float(r["value"]) for r in rows if r["section"] == "prevalence" and r["split"] == "train"}
    assert list(got) == list(ctrate.ABNORMALITIES)
    for name in ctrate.ABNORMALITIES:
        assert got[name] == pytest.approx(np.mean([int(r[name]) for r in labels]), abs=1e-6)
    frac = {r["name"]: float(r["value"]) for r in rows if r["section"] == "hu_fraction" and r["split"] == "valid"}
    assert frac["air (< -900)"] > 0.05 and frac["lung (-900..-500)"] > 0.02 and frac["bone (> 300)"] > 0.0
    words = {r["name"]: float(r["value"]) for r in rows if r["section"] == "report_words" and r["split"] == "train"}
    assert 5 < words["mean"] <= words["max"]
    png = (mv3d_project.root / "stats" / "stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert set(mv3d_project.manifest()["artifacts"]) == {"stats.summary", "stats.plot"}


def test_source_defaults_to_paths_raw_in_settings(mv3d_project, mv3d_cli, synthetic_ctrate):
    mv3d_cli(["stats"], project=mv3d_project, ok=False)  # no source anywhere: a clear error
    mv3d_project.settings_path.write_text(f'[paths]\nraw = "{synthetic_ctrate}"\n[stages.stats]\nmax-volumes = 0\n')
    mv3d_cli(["stats"], project=mv3d_project)
    hist = [r for r in _summary(mv3d_project) if r["section"] == "hu_histogram"]
    assert sum(int(r["value"]) for r in hist) == 0  # max-volumes = 0 came from mv3d.toml


def test_raw_and_fixed_volumes_give_the_same_hu(tmp_path):
    """CT-RATE v1 stores HU+1024, v2 stores HU, and both CSVs say intercept -1024: 'auto' must
    rescale the first and not the second (the double rescale of CT-CLIP#50)."""
    kw = dict(n_train=1, n_valid=1, shape=(16, 48, 48), seed=3)
    make_synthetic_dataset(tmp_path / "raw", hu="raw", **kw)
    make_synthetic_dataset(tmp_path / "fixed", hu="fixed", **kw)
    raw = dataset_stats(tmp_path / "raw", hu_source="auto")["hu"]["valid"]
    fixed = dataset_stats(tmp_path / "fixed", hu_source="auto")["hu"]["valid"]
    assert raw.sum() == fixed.sum() > 0
    np.testing.assert_array_equal(raw, fixed)
    wrong = dataset_stats(tmp_path / "fixed", hu_source="raw")["hu"]["valid"]  # forced double rescale
    assert wrong[HU_EDGES[:-1] < -1000].sum() > 0.3 * wrong.sum()


def test_labels_csv_missing_columns_is_a_clear_error(tmp_path, mv3d_project, mv3d_cli, synthetic_ctrate):
    data = tmp_path / "data"
    shutil.copytree(synthetic_ctrate, data)
    path = data / ctrate.labels_csv("train")
    rows = ctrate.read_csv_rows(path)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "Emphysema"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    res = mv3d_cli(["stats", str(data)], project=mv3d_project, ok=False)
    assert "lacks the label columns ['Emphysema']" in res.output
