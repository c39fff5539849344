"""Per-class Dice of predicted label maps against reference label maps (``mv3d segment-finetune``'s metrics).

Dice of class k in one case: 2 |P_k ∩ G_k| / (|P_k| + |G_k|). A class absent from both the prediction and the
reference of a case has no Dice there (NaN, as nnU-Net's evaluation): it is left out of that class's mean rather
than counted as a perfect 1. A class absent from the reference but predicted scores 0. The mean DSC is the mean of
the per-class means (classes with no Dice anywhere left out).

Files (written atomically): ``metrics.json`` (the summary, per-class means and per-case values), ``per_class.csv``
(label, name, dice, cases, reference voxels) and ``per_case.csv`` (case, then one column per class).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..eval.runs import clean_json
from ..fs import atomic_write_json, atomic_write_text

__all__ = ["case_dice", "summarize_dice", "write_metrics"]


def case_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label in one case (NaN where the label is in neither map). ``pred`` and ``ref`` are integer
    label maps of the same shape."""
    if pred.shape != ref.shape:
        raise DataError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    # one pass: count voxels per (ref, pred) pair of labels
    n = int(max(max(labels, default=0), pred.max(initial=0), ref.max(initial=0))) + 1
    joint = np.bincount(ref.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel(), minlength=n * n)
    joint = joint.reshape(n, n)  # (ref label, pred label)
    out = {}
    for k in labels:
        inter, denom = joint[k, k], joint[k, :].sum() + joint[:, k].sum()
        out[int(k)] = float(2 * inter / denom) if denom else math.nan
    return out


def summarize_dice(per_case: Mapping[str, Mapping[int, float]], names: Mapping[int, str],
                   ref_voxels: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Per-class means over the cases where the class has a Dice, and the mean DSC over classes."""
    per_class = {}
    for k, name in names.items():
        values = [d[k] for d in per_case.values() if not math.isnan(d[k])]
        per_class[name] = {"label": int(k), "dice": float(np.mean(values)) if values else math.nan,
                           "cases": len(values), "reference_voxels": int((ref_voxels or {}).get(k, 0))}
    means = [c["dice"] for c in per_class.values() if not math.isnan(c["dice"])]
    return {"mean_dice": float(np.mean(means)) if means else math.nan, "n_cases": len(per_case),
            "per_class": per_class,
            "per_case": {case: {names[k]: v for k, v in d.items()} for case, d in per_case.items()}}


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _cell(v: Any) -> Any:
    return "" if isinstance(v, float) and math.isnan(v) else (f"{v:.6f}" if isinstance(v, float) else v)


def write_metrics(run_dir: str | Path, summary: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
    """``metrics.json`` (``extra`` first, then the summary), ``per_class.csv`` and ``per_case.csv`` in
    ``run_dir``; returns the metrics file."""
    run_dir = Path(run_dir)
    per_class = summary["per_class"]
    rows = [["label", "name", "dice", "cases", "reference_voxels"]]
    rows += [[c["label"], name, _cell(c["dice"]), c["cases"], c["reference_voxels"]] for name, c in per_class.items()]
    rows.append(["", "mean", _cell(summary["mean_dice"]), summary["n_cases"], ""])
    atomic_write_text(run_dir / "per_class.csv", _csv(rows))
    names = list(per_class)
    case_rows = [["case", *names]]
    case_rows += [[case, *(_cell(d[n]) for n in names)] for case, d in summary["per_case"].items()]
    atomic_write_text(run_dir / "per_case.csv", _csv(case_rows))
    path = run_dir / "metrics.json"
    atomic_write_json(path, clean_json({**extra, **summary}))
    return path
