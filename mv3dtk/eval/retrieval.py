"""Retrieval with the peers' protocols (``shared/reference/ctclip-fvlm.md`` §3.3), each beside a
random-embedding baseline:

* ``report``: report -> volume recall@k (k = 5, 10, 50, 100) over the whole split; query i is the
  report of volume i (volumes sorted by id, so report and volume indices always agree), the hit is
  volume i only (reconstructions sharing a report count only their own index), ties go to the
  lower index (CT-CLIP's stable sort). Volumes without a report are not queries but stay in the pool.
* ``volume``: volume -> volume MAP@k (k = 1, 5, 10, 50) by label Jaccard; queries are all volumes
  with complete labels, the pool those with at least one positive label, the query stays in the
  pool. ``map`` is the per-k mean; ``map_ctclip`` the released script's running mean (the paper's).
* ``region``: phrase grounding: for each (volume, region) whose mask holds the region and that has
  region sentences, rank every distinct region text of the split (a region's sentences joined, as
  pretraining pairs them) by its local embedding; top-10 / top-50 accuracy, also per region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..data.ctrate import ABNORMALITIES
from ..errors import ConfigError, Mv3dError
from ..fs import atomic_path, atomic_write_json
from ..index import fetch_embeddings, index_path, text_id
from ..log import get_logger
from ..models.medvista3d import load_model
from . import metrics as M
from .encode import encode_split, encode_texts, load_labels
from .runs import clean_json, parse_choices

TASKS = ("report", "volume", "region")
REPORT_KS = (5, 10, 50, 100)
VOLUME_KS = (1, 5, 10, 50)
GROUNDING_KS = (10, 50)
CHUNK = 1024  # queries scored at once: (CHUNK, N) similarities in memory


def parse_ks(ks: Sequence[int] | str, option: str = "-k") -> list[int]:
    try:
        vals = [int(s) for s in ks.split(",") if s.strip()] if isinstance(ks, str) else [int(k) for k in ks]
    except ValueError:
        raise ConfigError(f"{option} {ks!r}: give positive integers separated by commas, e.g. 5,10,50,100") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"{option} {ks!r}: give positive integers separated by commas, e.g. 5,10,50,100")
    return sorted(dict.fromkeys(vals))


def resolve_tasks(tasks: Sequence[str] | str) -> list[str]:
    return parse_choices(tasks, TASKS, "--tasks")


def rank_targets(queries: np.ndarray, candidates: np.ndarray, target: np.ndarray, k: int,
                 chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, E), candidates (N, E), target (Q,) -> (ranks (Q,) 0-based of each target,
    top (Q, min(k, N)) best candidates), scored by dot product, chunk by chunk."""
    ranks, tops = [], []
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ candidates.T  # (q, N)
        ranks.append(M.target_ranks(sim, target[s:s + chunk]))
        tops.append(M.top_k_indices(sim, k))
    if not ranks:
        return np.zeros(0, dtype=np.int64), np.zeros((0, min(k, len(candidates))), dtype=np.int64)
    return np.concatenate(ranks), np.concatenate(tops)


@dataclass
class TaskResult:
    name: str
    metrics: dict
    rankings: list[dict] = field(default_factory=list)  # task, query, target, rank (1-based), score, top


def report_to_volume(enc, report_emb: np.ndarray, ks: Sequence[int], seed: int) -> TaskResult:
    """Recall@k of each report (query i) finding volume i among all volumes of the split."""
    q = np.array([i for i, r in enumerate(enc.reports) if r.strip()], dtype=np.int64)
    ranks, top = rank_targets(report_emb[q], enc.global_, q, max(ks))
    V, E = enc.global_.shape
    r_img, r_txt = M.random_embeddings(V, E, seed), M.random_embeddings(V, E, seed + 1)
    r_ranks, _ = rank_targets(r_txt[q], r_img, q, max(ks))
    ids = enc.volume_ids
    metrics = {"n_queries": int(len(q)), "pool": V, "no_report": int(V - len(q)),
               "recall": M.hit_rate_at_k(ranks, ks), "random": M.hit_rate_at_k(r_ranks, ks),
               "expected_random": {k: min(k, V) / V for k in ks}}
    rows = [{"task": "report", "query": ids[i], "target": ids[i], "rank": int(rk) + 1, "score": None,
             "top": [ids[j] for j in t]} for i, rk, t in zip(q, ranks, top)]
    return TaskResult("report", metrics, rows)


def volume_to_volume(enc, labels: np.ndarray, ks: Sequence[int], seed: int) -> TaskResult:
    """CT-CLIP's volume -> volume MAP@k by label Jaccard (labels (V, 18), NaN = missing)."""
    complete = ~np.isnan(labels).any(1)  # (V,)
    q = np.flatnonzero(complete)
    pool = np.flatnonzero(complete & (np.nan_to_num(labels) > 0).any(1))
    metrics: dict = {"n_queries": int(len(q)), "pool": int(len(pool)), "missing_labels": int((~complete).sum())}
    if not len(q) or not len(pool):
        metrics.update(map={k: None for k in ks}, map_ctclip={k: None for k in ks}, random={k: None for k in ks})
        return TaskResult("volume", metrics, [])
    Y = labels[q]
    P = labels[pool]
    sim = enc.global_[q] @ enc.global_[pool].T  # (Q, N)
    rnd = M.random_embeddings(len(labels), enc.global_.shape[1], seed + 2)
    rsim = rnd[q] @ rnd[pool].T  # (Q, N)
    metrics.update(map=M.map_at_k_jaccard(sim, Y, P, ks), map_ctclip=M.map_at_k_jaccard(sim, Y, P, ks, cumulative=True),
                   random=M.map_at_k_jaccard(rsim, Y, P, ks))
    top = M.top_k_indices(sim, max(ks))  # (Q, kmax)
    score = np.take_along_axis(M.jaccard(Y, P), top, 1).mean(1)  # (Q,) mean Jaccard of the top kmax
    ids = enc.volume_ids
    rows = [{"task": "volume", "query": ids[i], "target": None, "rank": None, "score": float(s),
             "top": [ids[pool[j]] for j in t]} for i, s, t in zip(q, score, top)]
    return TaskResult("volume", metrics, rows)


def grounding_candidates(enc) -> tuple[list[str], list[str], list[tuple[int, int, int]]]:
    """(texts, keys, queries): the distinct region texts of the split (in volume, region order), the
    ``volume_id/region`` of each text's first occurrence, and the (volume, region, text index)
    of each query (the region is in the mask and has sentences)."""
    texts, keys, index, queries = [], [], {}, []
    for v, row in enumerate(enc.region_texts):
        for r, text in enumerate(row):
            if not enc.region_valid[v, r]:
                continue
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
                keys.append(f"{enc.volume_ids[v]}/{enc.regions[r]}")
            if enc.present[v, r]:
                queries.append((v, r, index[text]))
    return texts, keys, queries


def region_grounding(enc, text_emb: np.ndarray, texts_keys: list[str], queries, ks: Sequence[int],
                     seed: int) -> TaskResult:
    """Top-k accuracy of finding each (volume, region)'s own text among all distinct region texts."""
    if not queries:
        return TaskResult("region", {"n_queries": 0, "candidates": len(texts_keys), "top_k": {k: None for k in ks},
                                     "random": {k: None for k in ks}, "per_region": {}}, [])
    v, r, t = (np.array(c, dtype=np.int64) for c in zip(*queries))
    ranks, top = rank_targets(enc.local[v, r], text_emb, t, max(ks))
    E = text_emb.shape[1]
    r_ranks, _ = rank_targets(M.random_embeddings(len(v), E, seed + 3), M.random_embeddings(len(text_emb), E, seed + 4),
                              t, max(ks))
    per_region = {}
    for ri, name in enumerate(enc.regions):
        sel = r == ri
        if sel.any():
            per_region[name] = {"n_queries": int(sel.sum()), "top_k": M.hit_rate_at_k(ranks[sel], ks)}
    metrics = {"n_queries": int(len(v)), "candidates": len(texts_keys), "top_k": M.hit_rate_at_k(ranks, ks),
               "random": M.hit_rate_at_k(r_ranks, ks), "per_region": per_region}
    rows = [{"task": "region", "query": f"{enc.volume_ids[a]}/{enc.regions[b]}", "target": texts_keys[c],
             "rank": int(rk) + 1, "score": None, "top": [texts_keys[j] for j in tp]}
            for a, b, c, rk, tp in zip(v, r, t, ranks, top)]
    return TaskResult("region", metrics, rows)


def index_report_embeddings(project_root: str | Path, encoder: str, volume_ids: Sequence[str],
                            reports: Sequence[str], log=None) -> tuple[np.ndarray, np.ndarray] | None:
    """Report embeddings already in ``index/texts.duckdb`` made by this exact encoder identity
    (``model.text_identity``, what ``mv3d index-texts --encoder <model dir>`` stores): (emb (V, E),
    found (V,) bool). The text id hashes the text itself, so a report changed since the index was
    built is simply not found (a stale row is never used). None when there is no usable index."""
    db = index_path(project_root)
    if not db.is_file():
        return None
    ids = [text_id("report", vid, None, rep) for vid, rep in zip(volume_ids, reports)]
    try:
        emb = fetch_embeddings(db, encoder, ids, strict=False).numpy().astype(np.float32)  # (V, E), NaN: missing
    except Mv3dError as e:  # no rows for this encoder, being written, not an index: encode instead
        (log or get_logger("retrieve")).info(
            "encoding the reports with the model (%s has none from its text tower to reuse; to reuse them next "
            "time: mv3d index-texts --encoder <model dir>)", db)
        get_logger("retrieve").debug("index lookup: %s", e)
        return None
    found = ~np.isnan(emb).any(1)  # (V,)
    if not found.any():
        return None
    emb[~found] = 0.0
    emb[found] /= np.maximum(np.linalg.norm(emb[found], axis=1, keepdims=True), 1e-12)
    return emb, found


def _report_embeddings(model, project_root, enc, *, use_index: bool, device, precision, log) -> tuple[np.ndarray, int]:
    cached = (index_report_embeddings(project_root, model.text_identity, enc.volume_ids, enc.reports, log)
              if use_index else None)
    if cached is None or cached[0].shape[1] != enc.global_.shape[1]:
        return encode_texts(model, enc.reports, device=device, precision=precision), 0
    emb, found = cached
    if (~found).any():
        miss = np.flatnonzero(~found)
        emb[miss] = encode_texts(model, [enc.reports[i] for i in miss], device=device, precision=precision)
    log.info("report embeddings: %d of %d from index/texts.duckdb", int(found.sum()), len(found))
    return emb, int(found.sum())


def evaluate(model, project_root: str | Path, *, split: str = "valid", tasks: Sequence[str] | str = TASKS,
             ks: Sequence[int] | str = REPORT_KS, volume_ks: Sequence[int] | str = VOLUME_KS,
             grounding_ks: Sequence[int] | str = GROUNDING_KS, seed: int = 0, batch_size: int = 4, workers: int = 0,
             device=None, precision: str = "bf16", use_index: bool = True, encoded=None,
             log=None) -> tuple[object, list[TaskResult]]:
    """Run the retrieval ``tasks`` of ``model`` on ``split``: (the EncodedSplit, one result per task).
    ``encoded`` (an EncodedSplit of the split, with masks for ``region``) skips the volume encoding."""
    log = log or get_logger("retrieve")
    tasks = resolve_tasks(tasks)
    ks, volume_ks, grounding_ks = parse_ks(ks), parse_ks(volume_ks, "--volume-k"), parse_ks(grounding_ks,
                                                                                          "--grounding-k")
    enc = encoded or encode_split(model, project_root, split, batch_size=batch_size, workers=workers, device=device,
                                  precision=precision, use_masks="region" in tasks, log=log)
    out = []
    if "report" in tasks:
        emb, n_index = _report_embeddings(model, project_root, enc, use_index=use_index, device=device,
                                          precision=precision, log=log)
        res = report_to_volume(enc, emb, ks, seed)
        res.metrics["from_index"] = n_index
        out.append(res)
    if "volume" in tasks:
        out.append(volume_to_volume(enc, load_labels(project_root, enc.volume_ids, ABNORMALITIES), volume_ks, seed))
    if "region" in tasks:
        texts, keys, queries = grounding_candidates(enc)
        emb = encode_texts(model, texts, device=device, precision=precision) if texts else np.zeros((0, 1), np.float32)
        out.append(region_grounding(enc, emb, keys, queries, grounding_ks, seed))
    small = [k for k in ks if k >= len(enc.volume_ids)]
    if "report" in tasks and small:
        log.warning("recall@%s: k is not smaller than the %d volumes of the split, so every query hits",
                    ",".join(map(str, small)), len(enc.volume_ids))
    return enc, out


def retrieve(model, project_root: str | Path, *, split: str = "valid", tasks: Sequence[str] | str = TASKS,
             ks: Sequence[int] | str = REPORT_KS, seed: int = 0, batch_size: int = 4, device=None, log=None) -> dict:
    """The metrics dict of the retrieval ``tasks`` (keys ``report``, ``volume``, ``region``)."""
    _, res = evaluate(model, project_root, split=split, tasks=tasks, ks=ks, seed=seed, batch_size=batch_size,
                      device=device, log=log)
    return clean_json({r.name: r.metrics for r in res})


def run_retrieve(project_root: str | Path, model_dir: str | Path, out_dir: str | Path, *, split: str = "valid",
                 tasks: Sequence[str] | str = TASKS, ks: Sequence[int] | str = REPORT_KS,
                 volume_ks: Sequence[int] | str = VOLUME_KS, grounding_ks: Sequence[int] | str = GROUNDING_KS,
                 seed: int = 0, batch_size: int = 4, workers: int = 0, device=None, precision: str = "bf16",
                 use_index: bool = True, log=None) -> dict:
    """Load the model, run the tasks, write ``out_dir``/{rankings.parquet, metrics.json} atomically
    (metrics.json last) and return the metrics dict."""
    model = load_model(model_dir)
    enc, res = evaluate(model, project_root, split=split, tasks=tasks, ks=ks, volume_ks=volume_ks,
                   grounding_ks=grounding_ks, seed=seed, batch_size=batch_size, workers=workers, device=device,
                   precision=precision, use_index=use_index, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = {"task": pl.String, "query": pl.String, "target": pl.String, "rank": pl.Int64, "score": pl.Float64,
              "top": pl.List(pl.String)}
    rows = [row for r in res for row in r.rankings]
    with atomic_path(out / "rankings.parquet") as tmp:
        pl.DataFrame(rows, schema=schema).write_parquet(tmp)
    summary = clean_json({"task": "retrieve", "split": split, "model": str(Path(model_dir)),
                          "n_volumes": len(enc.volume_ids), "seed": seed,
                          "tasks": {r.name: r.metrics for r in res}})
    atomic_write_json(out / "metrics.json", summary)
    return summary


def format_table(summary: dict) -> str:
    """Model and random baseline side by side, one line per task and k."""
    t = summary["tasks"]
    lines = [f"retrieval on {summary['split']} ({summary['n_volumes']} volumes), model {summary['model']}",
             f"{'task':<18}{'metric':<10}{'model':>8}{'random':>8}  queries / pool", "-" * 62]

    def line(task: str, name: str, val, rnd, note: str = "") -> None:
        f = (lambda x: "   -" if x is None else f"{x:8.3f}")
        lines.append(f"{task:<18}{name:<10}{f(val):>8}{f(rnd):>8}  {note}".rstrip())

    if "report" in t:
        m = t["report"]
        for i, k in enumerate(m["recall"]):
            line("report->volume" if i == 0 else "", f"R@{k}", m["recall"][k], m["random"][k],
                 f"{m['n_queries']} / {m['pool']}" if i == 0 else "")
    if "volume" in t:
        m = t["volume"]
        for i, k in enumerate(m["map"]):
            line("volume->volume" if i == 0 else "", f"MAP@{k}", m["map"][k], m["random"][k],
                 f"{m['n_queries']} / {m['pool']}" if i == 0 else "")
        if m["map_ctclip"] and any(v is not None for v in m["map_ctclip"].values()):
            lines.append(f"{'':<18}(CT-CLIP running mean: " + ", ".join(
                f"@{k} {v:.3f}" for k, v in m["map_ctclip"].items() if v is not None) + ")")
    if "region" in t:
        m = t["region"]
        for i, k in enumerate(m["top_k"]):
            line("region grounding" if i == 0 else "", f"top-{k}", m["top_k"][k], m["random"][k],
                 f"{m['n_queries']} / {m['candidates']}" if i == 0 else "")
    return "\n".join(lines)
