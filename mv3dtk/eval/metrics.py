"""Evaluation metrics, pure numpy, each the exact rule of a peer's protocol
(``shared/reference/ctclip-fvlm.md`` §3.2, §3.3, §5.4).

Classification (CT-CLIP ``scripts/eval.py`` / ``bootstrap_values.py``; fVLM ``calc_metrics.py``):
:func:`auroc`, :func:`ctclip_threshold` (100-point grid, closest to the ROC corner, ties to the larger
threshold), :func:`binary_metrics` at that threshold (support-weighted F1, binary precision, accuracy,
sensitivity, specificity), :func:`per_class_metrics` over the columns of a label matrix (missing
labels, NaN, are left out per column), :func:`bootstrap` confidence intervals that resample volumes.

Retrieval (CT-CLIP ``report_to_volume_new.py`` / ``volume_to_volume_new.py``): :func:`target_ranks`
(ties broken by the lower index, as Python's stable ``sorted(..., reverse=True)`` in the peers'
scripts), :func:`hit_rate_at_k` (report->volume recall@k, region grounding top-k),
:func:`top_k_indices`, :func:`map_at_k_jaccard`, :func:`random_embeddings` (the baseline).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

CTCLIP_GRID = np.linspace(0.0, 1.0, 100)
CLASS_METRICS = ("auroc", "f1_weighted", "precision", "accuracy", "sensitivity", "specificity")


# --------------------------------------------------------------------------- classification


def _binary(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def auroc(y, s) -> float:
    """Area under the ROC curve of scores ``s`` for binary labels ``y`` (1 = positive): the
    Mann-Whitney statistic with mid-ranks for ties, which equals sklearn's ``roc_auc_score`` /
    ``auc(roc_curve(...))``. NaN when ``y`` has a single class."""
    y, s = _binary(y, s)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # mid-rank of each run of equal scores (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y, s) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score, from (0, 0) to (1, 1), for plotting."""
    y, s = _binary(y, s)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y == 1)[last]
    fp = np.cumsum(y != 1)[last]
    n_pos, n_neg = max(int((y == 1).sum()), 1), max(int((y != 1).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _counts_above(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TP, FP) of the prediction ``p > t`` for every t in ``thresholds``."""
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y != 1])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="right")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="right")
    return tp, fp


def ctclip_threshold(y, p, grid: np.ndarray = CTCLIP_GRID) -> float:
    """CT-CLIP's operating point (``bootstrap_values.py::find_threshold``): over the grid
    ``linspace(0, 1, 100)``, predict ``p > t`` and take the t minimising ``sqrt((1-TPR)^2 + FPR^2)``,
    the distance to the ROC top-left corner; ties go to the larger t (the script's ``<=``). Chosen on
    the evaluated set itself, as the peers do. NaN when ``y`` has a single class."""
    y, p = _binary(y, p)
    n_pos, n_neg = int((y == 1).sum()), int((y != 1).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp, fp = _counts_above(y, p, np.asarray(grid, dtype=np.float64))
    tpr, fpr = tp / n_pos, fp / n_neg
    dist = np.sqrt((1.0 - tpr) ** 2 + fpr ** 2)
    best = len(dist) - 1 - int(np.argmin(dist[::-1]))  # the last (largest t) of the minima
    return float(grid[best])


def binary_metrics(y, pred) -> dict[str, float]:
    """Metrics of binary predictions ``pred`` against labels ``y`` (both 0/1):

    * ``f1_weighted``: sklearn ``f1_score(average="weighted")``, the F1 of class 0 and of class 1
      weighted by their support (CT-CLIP's F1; higher than the positive-class F1);
    * ``precision``: binary precision of class 1 (0 when nothing is predicted positive);
    * ``accuracy``; ``sensitivity`` (TPR) and ``specificity`` (TNR), as fVLM reports.
    """
    y, pred = _binary(y, pred)
    t, q = y == 1, pred == 1
    tp, fp = int((t & q).sum()), int((~t & q).sum())
    fn, tn = int((t & ~q).sum()), int((~t & ~q).sum())
    n = tp + fp + fn + tn

    def f1(a: int, b: int, c: int) -> float:  # 2TP / (2TP + FP + FN); 0 when undefined
        return 2 * a / (2 * a + b + c) if (2 * a + b + c) else 0.0

    support1, support0 = tp + fn, tn + fp
    weighted = (f1(tp, fp, fn) * support1 + f1(tn, fn, fp) * support0) / n if n else float("nan")
    return {
        "f1_weighted": float(weighted),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "accuracy": (tp + tn) / n if n else float("nan"),
        "sensitivity": tp / support1 if support1 else float("nan"),
        "specificity": tn / support0 if support0 else float("nan"),
    }


def class_metrics(y, p, grid: np.ndarray = CTCLIP_GRID) -> dict[str, float]:
    """AUROC, CT-CLIP threshold and the binary metrics at it for one class. Rows with a missing
    label (NaN) are left out; every value is NaN when fewer than both classes remain."""
    y, p = _binary(y, p)
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    out = {"n": int(len(y)), "positives": int((y == 1).sum())}
    t = ctclip_threshold(y, p, grid)
    if np.isnan(t):
        return {**out, "threshold": t, **{m: float("nan") for m in CLASS_METRICS}}
    return {**out, "threshold": t, "auroc": auroc(y, p), **binary_metrics(y, (p > t).astype(np.int8))}


def per_class_metrics(Y, P, names: Sequence[str]) -> list[dict]:
    """Y (V, L) labels with NaN for missing, P (V, L) probabilities -> one dict per class
    (``label`` + :func:`class_metrics`)."""
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    if Y.shape != P.shape or Y.ndim != 2 or Y.shape[1] != len(names):
        raise ValueError(f"labels {Y.shape}, probabilities {P.shape} and {len(names)} names do not match")
    return [{"label": name, **class_metrics(Y[:, j], P[:, j])} for j, name in enumerate(names)]


def macro_average(rows: list[dict], metrics: Sequence[str] = CLASS_METRICS) -> dict[str, float]:
    """Mean of each metric over the classes where it is defined (``n_classes``: how many)."""
    out: dict[str, float] = {}
    for m in metrics:
        vals = np.array([r[m] for r in rows], dtype=np.float64)
        out[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    out["n_classes"] = int(sum(np.isfinite(r["auroc"]) for r in rows))
    return out


def bootstrap(Y, P, names: Sequence[str], *, n: int, seed: int = 0, confidence: float = 0.95,
              statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None) -> dict:
    """Bootstrap over volumes: ``n`` times draw V rows of (Y, P) with replacement (seeded
    ``numpy.random.default_rng(seed)``), recompute the macro metrics (the threshold is chosen again
    on each resample, as on the full set) and the per-class AUROC. Returns, per macro metric,
    ``mean``, ``std``, ``lo``, ``hi`` (the central ``confidence`` percentile interval), and the same
    for each class's AUROC under ``per_class``. (CT-CLIP's released script has the resampling lines
    commented out, so its intervals collapse; these resample.)"""
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    if n < 1:
        raise ValueError("bootstrap needs n >= 1")
    rng = np.random.default_rng(seed)
    stat = statistic or (lambda y, p: _macro_and_aurocs(y, p, names))
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(Y), len(Y))
        for k, v in stat(Y[idx], P[idx]).items():
            draws.setdefault(k, []).append(v)
    alpha = (1.0 - confidence) / 2.0
    summary = {k: _interval(np.array(v), alpha) for k, v in draws.items()}
    out = {"n": n, "seed": seed, "confidence": confidence,
           "macro": {k: v for k, v in summary.items() if not k.startswith("auroc:")},
           "per_class": {k.split(":", 1)[1]: v for k, v in summary.items() if k.startswith("auroc:")}}
    return out


def _macro_and_aurocs(Y: np.ndarray, P: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    rows = per_class_metrics(Y, P, names)
    macro = macro_average(rows)
    macro.pop("n_classes")
    return {**macro, **{f"auroc:{r['label']}": r["auroc"] for r in rows}}


def _interval(v: np.ndarray, alpha: float) -> dict[str, float]:
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "lo": float("nan"), "hi": float("nan")}
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return {"mean": float(v.mean()), "std": float(v.std()), "lo": float(lo), "hi": float(hi)}


# --------------------------------------------------------------------------- retrieval


def target_ranks(sim, target) -> np.ndarray:
    """sim (Q, N) scores, target (Q,) the index of each query's correct item -> (Q,) its 0-based
    rank in the descending order, ties broken by the lower index (Python's stable
    ``sorted(enumerate(s), key=score, reverse=True)`` in CT-CLIP's scripts). Rank < k <=> hit@k."""
    sim = np.asarray(sim)
    target = np.asarray(target, dtype=np.int64)
    q = np.arange(len(sim))
    ts = sim[q, target][:, None]  # (Q, 1)
    before = np.arange(sim.shape[1])[None, :] < target[:, None]  # (Q, N)
    return ((sim > ts) | ((sim == ts) & before)).sum(1).astype(np.int64)


def hit_rate_at_k(ranks, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose correct item ranks in the top k, for each k (recall@k / top-k)."""
    ranks = np.asarray(ranks)
    if not len(ranks):
        return {int(k): float("nan") for k in ks}
    return {int(k): float((ranks < k).mean()) for k in ks}


def top_k_indices(sim, k: int) -> np.ndarray:
    """sim (Q, N) -> (Q, min(k, N)) indices of the k best items per row, best first, ties to the
    lower index (the order of the peers' stable sort)."""
    sim = np.asarray(sim)
    k = min(int(k), sim.shape[1])
    if k >= sim.shape[1]:
        return np.argsort(-sim, axis=1, kind="stable")
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (Q, k) the k best, unordered
    kth = np.take_along_axis(sim, part, 1).min(1, keepdims=True)  # (Q, 1) the k-th best score
    # items tied with the k-th best may be cut arbitrarily by argpartition: take all items scoring
    # >= the k-th score and keep the first k in (score desc, index asc) order
    out = np.empty((len(sim), k), dtype=np.int64)
    for i in range(len(sim)):
        cand = np.flatnonzero(sim[i] >= kth[i, 0])
        out[i] = cand[np.lexsort((cand, -sim[i, cand]))][:k]
    return out


def jaccard(A, B) -> np.ndarray:
    """A (Q, L), B (N, L) binary label rows -> (Q, N) ``|a & b| / |a | b|`` (0 where both are empty)."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    inter = A @ B.T  # (Q, N)
    union = A.sum(1)[:, None] + B.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def map_at_k_jaccard(sim, query_labels, pool_labels, ks: Sequence[int], *, cumulative: bool = False
                     ) -> dict[int, float]:
    """Volume -> volume "MAP@k" of CT-CLIP: for each query, the label Jaccard with each of its top-k
    pool items by ``sim`` (Q, N), averaged over the k items, then over the queries.

    The caller builds the pool as CT-CLIP does (volumes with at least one positive label; the query
    is not removed from the pool). ``cumulative=True`` reproduces the released script's running
    mean, which is not reset between k values (its "MAP@5" averages the queries' @1 and @5 values
    when ``ks`` starts with 1); the paper's numbers were computed that way."""
    sim = np.asarray(sim)
    J = jaccard(query_labels, pool_labels)  # (Q, N)
    top = top_k_indices(sim, max(ks))  # (Q, kmax)
    rel = np.take_along_axis(J, top, 1)  # (Q, kmax) Jaccard of each retrieved item
    out: dict[int, float] = {}
    running: list[np.ndarray] = []
    for k in ks:
        per_query = rel[:, :k].mean(1)  # (Q,)
        running.append(per_query)
        out[int(k)] = float(np.concatenate(running).mean() if cumulative else per_query.mean())
    return out


def random_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) L2-normalised Gaussian vectors: the random-embedding baseline, seeded."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
