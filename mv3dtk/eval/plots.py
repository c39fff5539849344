"""Evaluation figures (matplotlib, Agg backend, imported lazily; written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..fs import atomic_path
from . import metrics as M


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def roc_grid(path: str | Path, results, *, columns: int = 6) -> Path:
    """One ROC panel per abnormality, one curve per zero-shot mode (``results``: the
    :class:`~mv3dtk.eval.zeroshot.ModeResult` list), AUROC in the legend; PNG at ``path``."""
    plt = _pyplot()
    labels = list(dict.fromkeys(lab for r in results for lab in r.labels))
    cols = min(columns, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, lab in zip(axes.ravel(), labels):
        for r in results:
            if lab not in r.labels:
                continue
            j = r.labels.index(lab)
            y, p = r.targets[:, j], r.probs[:, j]
            keep = ~np.isnan(y)
            y, p = y[keep], p[keep]
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr = M.roc_curve(y, p)
            ax.plot(fpr, tpr, lw=1.2, label=f"{r.mode} {M.auroc(y, p):.2f}")
        ax.plot([0, 1], [0, 1], ls=":", lw=0.8, color="grey")
        ax.set_title(lab, fontsize=8)
        ax.tick_params(labelsize=6)
        if ax.lines[:-1]:
            ax.legend(fontsize=6, loc="lower right", frameon=False)
        else:
            ax.text(0.5, 0.5, "one class only", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    for ax in axes.ravel()[len(labels):]:
        ax.axis("off")
    fig.supxlabel("false positive rate", fontsize=8)
    fig.supylabel("true positive rate", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
