"""``loss.png`` of a training run: every loss term's raw curve, and a smoothed line over it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..fs import atomic_path
from .options import LOSS_TERMS

TERMS = ("loss", *LOSS_TERMS)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """A trailing moving average (n,) -> (n,): point i is the mean of the up to ``window`` values ending at i,
    so the line starts at the first value and never looks ahead."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or window <= 1:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))  # (n + 1,)
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_metrics(metrics: Path, png: Path, title: str = "MedVista3D pretraining") -> None:
    """``metrics.jsonl`` -> ``png``: raw curves (faint) and their moving average (window: 5 % of the steps)."""
    import matplotlib  # only when a plot is written: it costs a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    window = max(1, len(rows) // 20)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in TERMS:
        if rows and key in rows[0]:
            steps, values = [r["step"] for r in rows], np.array([r[key] for r in rows], dtype=np.float64)
            raw, = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color=raw.get_color(), linewidth=1.8,
                    label=f"{key} (mean of {window})" if window > 1 else key)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
