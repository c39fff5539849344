"""The statistics themselves: plain functions, no Click (callable from Python and tests)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mv3dtk.data import ctrate
from mv3dtk.errors import DataError
from mv3dtk.fs import atomic_path, atomic_write_text

HU_EDGES = np.arange(-1100, 1510, 10)  # 10 HU bins over [-1100, 1500); values outside are clipped in
HU_RANGES = {  # tissue classes reported as fractions of all voxels
    "air (< -900)": (-np.inf, -900), "lung (-900..-500)": (-900, -500), "fat (-150..-50)": (-150, -50),
    "soft tissue (-50..100)": (-50, 100), "bone (> 300)": (300, np.inf),
}


def _splits(root: Path) -> list[str]:
    found = [s for s in ctrate.SPLIT_FILE_NAMES if (root / ctrate.reports_csv(s)).is_file()]
    if not found:
        raise DataError(
            f"{root} has no {ctrate.reports_csv('train')} or {ctrate.reports_csv('valid')}; "
            "point SOURCE at the root of a CT-RATE-layout dataset (the folder that holds dataset/)"
        )
    return found


def label_prevalence(root: Path, split: str) -> dict[str, Any]:
    path = root / ctrate.labels_csv(split)
    if not path.is_file():
        return {"n": 0, "positive": {}}
    rows = ctrate.read_csv_rows(path)
    missing = [c for c in ctrate.ABNORMALITIES if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{path} lacks the label columns {missing}; it must have all 18 CT-RATE columns")
    positive = {c: sum(int(float(r[c] or 0)) for r in rows) for c in ctrate.ABNORMALITIES}
    return {"n": len(rows), "positive": positive}


def report_words(root: Path, split: str) -> list[int]:
    """Words in Findings_EN + Impressions_EN per report (``Not given.`` counts as empty)."""
    rows = ctrate.read_csv_rows(root / ctrate.reports_csv(split))
    sections = ("Findings_EN", "Impressions_EN")
    return [sum(len(r[s].split()) for s in sections if r.get(s) and r[s].strip() != ctrate.NOT_GIVEN) for r in rows]


def hu_histogram(root: Path, split: str, max_volumes: int, hu_source: str, log: logging.Logger) -> np.ndarray:
    from mv3dtk.data.preprocess import read_nifti, voxel_data

    meta_path = root / ctrate.metadata_csv(split)
    meta = {r["VolumeName"]: r for r in ctrate.read_csv_rows(meta_path)} if meta_path.is_file() else {}
    names = sorted(r["VolumeName"] for r in ctrate.read_csv_rows(root / ctrate.reports_csv(split)))
    pick = names if len(names) <= max_volumes else [names[i] for i in np.linspace(0, len(names) - 1, max_volumes).astype(int)]
    folder = ctrate.find_split_folder(root, split)
    counts = np.zeros(len(HU_EDGES) - 1, np.int64)
    for name in pick if folder is not None else []:
        path = root / ctrate.volume_relpath(name, folder.name)
        try:
            stored = voxel_data(read_nifti(path), path).astype(np.float32)  # (W, H, D), ISA-L decoding
        except DataError as e:  # one unreadable volume must not sink the statistics
            log.warning("skipped %s: %s", path, e)
            continue
        row = meta.get(name, {})
        if ctrate.needs_rescale(stored, hu_source):
            stored = stored * float(row.get("RescaleSlope") or 1) + float(row.get("RescaleIntercept") or -1024)
        counts += np.histogram(np.clip(stored, HU_EDGES[0], HU_EDGES[-1] - 1), bins=HU_EDGES)[0]
    return counts


def dataset_stats(source: str | Path, *, max_volumes: int = 16, hu_source: str = "auto",
                  log: logging.Logger | None = None) -> dict[str, Any]:
    root, log = Path(source), log or logging.getLogger("mv3d.stats")
    splits = _splits(root)
    return {
        "splits": splits,
        "n_volumes": {s: len(ctrate.read_csv_rows(root / ctrate.reports_csv(s))) for s in splits},
        "labels": {s: label_prevalence(root, s) for s in splits},
        "words": {s: report_words(root, s) for s in splits},
        "hu": {s: hu_histogram(root, s, max_volumes, hu_source, log) for s in splits},
    }


def summary_rows(stats: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    rows = []
    for s in stats["splits"]:
        lab = stats["labels"][s]
        rows += [("prevalence", s, c, round(k / lab["n"], 6)) for c, k in lab["positive"].items() if lab["n"]]
        w = np.asarray(stats["words"][s])
        rows += [("report_words", s, k, float(f(w))) for k, f in
                 (("mean", np.mean), ("median", np.median), ("p90", lambda a: np.percentile(a, 90)), ("max", np.max))]
        hist = stats["hu"][s]
        total = max(int(hist.sum()), 1)
        centres = (HU_EDGES[:-1] + HU_EDGES[1:]) / 2
        rows += [("hu_fraction", s, name, round(float(hist[(centres >= lo) & (centres < hi)].sum()) / total, 6))
                 for name, (lo, hi) in HU_RANGES.items()]
        rows += [("hu_histogram", s, str(int(e)), int(c)) for e, c in zip(HU_EDGES[:-1], hist)]
    return rows


def write_outputs(stats: dict[str, Any], csv_path: Path, png_path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "split", "name", "value"])
    w.writerows(summary_rows(stats))
    atomic_write_text(csv_path, buf.getvalue())
    with atomic_path(png_path) as tmp:
        plot(stats, tmp)


def plot(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 6), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    y = np.arange(len(ctrate.ABNORMALITIES))
    for i, s in enumerate(stats["splits"]):
        lab = stats["labels"][s]
        frac = [lab["positive"].get(k, 0) / max(lab["n"], 1) for k in ctrate.ABNORMALITIES]
        a.barh(y + i * 0.4, frac, height=0.4, label=f"{s} (n={lab['n']})")
        b.hist(stats["words"][s], bins=20, alpha=0.6, label=s)
        hist = stats["hu"][s]
        c.plot(HU_EDGES[:-1], hist / max(hist.sum(), 1), label=s)
    a.set(yticks=y + 0.2, yticklabels=ctrate.ABNORMALITIES, xlabel="fraction of volumes", title="Label prevalence")
    a.invert_yaxis()
    b.set(xlabel="words (findings + impressions)", ylabel="reports", title="Report length")
    c.set(xlabel="HU", ylabel="fraction of voxels", title="HU histogram")
    if any(stats["hu"][s].sum() for s in stats["splits"]):
        c.set_yscale("log")
    for ax in (a, b, c):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
