"""Semantic search over the index: DuckDB's own scan for a one-off query (:func:`search`), a torch matrix
product for many (:class:`TextSearcher`), and the text tables the CLI prints."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import torch

from ..errors import ConfigError, Mv3dError
from ..text.encoders import DEFAULT_ENCODER, IndexEncoder, resolve_encoder
from .store import index_path, open_index, require_index, _encoder_dim, _matrix, _where


@dataclass
class Hit:
    score: float
    text: str
    origin: str
    scope: str
    region: str | None
    label: str | None
    volume_ids: list[str]
    text_ids: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": round(self.score, 6)}


def _encode_queries(enc: IndexEncoder, queries: list[str]) -> "torch.Tensor":
    """(Q, E) query embeddings. A few short queries encode fastest on one CPU thread: OpenMP's
    fork/join costs more than the work (one query: ~10 ms on 1 thread, 40-500 ms on 2 threads of a
    busy 2-core machine)."""

    if len(queries) > 16:
        return enc.encode(queries)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return enc.encode(queries)  # (Q, E)
    finally:
        torch.set_num_threads(threads)


def _assemble(con, where: str, params: list, ranked: Sequence[tuple]) -> list[Hit]:
    """``ranked`` = [(text_sha, origin, scope, region, score), ...] best first -> hits with their text,
    label and every volume / row that holds the same text."""
    hits = {tuple(r[:4]): Hit(float(r[4]), "", r[1], r[2], r[3], None, [], []) for r in ranked}
    rows = con.execute(f"SELECT text_sha, origin, scope, region, label, text, volume_id, text_id FROM texts WHERE "
                       f"{where} AND text_sha IN (SELECT unnest(?)) ORDER BY volume_id, text_id",
                       [*params, sorted({r[0] for r in ranked})]).fetchall()
    for sha, origin, scope, region, label, text, volume_id, tid in rows:
        hit = hits.get((sha, origin, scope, region))
        if hit is not None:
            hit.text, hit.label = text, label
            hit.text_ids.append(tid)
            if volume_id is not None:
                hit.volume_ids.append(volume_id)
    return list(hits.values())


class TextSearcher:
    """Nearest texts by cosine similarity over a matrix loaded once (torch matmul + topk): for many
    queries (a batch of Q queries costs about one matmul), and for library users.

    ``TextSearcher(db, enc, scope="local").search(["pleural effusion"], k=5)`` -> one list of
    :class:`Hit` per query. Identical texts (a report shared by reconstructions) are one hit whose
    ``volume_ids`` lists every volume. The file is opened only while loading and per search."""

    def __init__(self, db_path: str | os.PathLike, encoder: IndexEncoder, *, origins=None, scope: str | None = None,
                 region: str | None = None):
        self.db, self.encoder = Path(db_path), encoder
        self.where, self.params = _where(encoder.identity, origins, scope, region)
        with open_index(self.db) as con:
            dim = _check_dim(con, self.db, encoder)
            tbl = con.sql(f"SELECT text_id, embedding FROM texts WHERE {self.where}",
                          params=self.params).to_arrow_table()
        self.ids = tbl.column("text_id").combine_chunks()
        self.matrix = _matrix(tbl, dim)  # (N, E)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def search(self, queries: str | Sequence[str], k: int = 5) -> list[list[Hit]]:
        queries = [queries] if isinstance(queries, str) else list(queries)
        if k < 1:
            raise ConfigError(f"-k must be at least 1 (got {k})")
        q = _encode_queries(self.encoder, queries)  # (Q, E)
        out = []
        for s in range(0, len(queries), 256):  # bound the (Q, N) score matrix
            scores = q[s:s + 256] @ self.matrix.T  # (q, N)
            out += [self._top(row, k) for row in scores]
        return out

    def _top(self, scores: "torch.Tensor", k: int) -> list[Hit]:
        """Top k distinct texts of one (N,) score row: widen the candidate set until k distinct."""

        n, m = scores.shape[0], min(scores.shape[0], 4 * k)
        with open_index(self.db) as con:
            while True:
                vals, pos = scores.topk(m)  # (m,)
                ids = self.ids.take(pa.array(pos.tolist())).to_pylist()
                keys = {r[0]: r[1:] for r in con.execute(
                    f"SELECT text_id, text_sha, origin, scope, region FROM texts WHERE {self.where} AND "
                    "text_id IN (SELECT unnest(?))", [*self.params, ids]).fetchall()}
                ranked: dict[tuple, float] = {}
                for score, tid in zip(vals.tolist(), ids):
                    ranked.setdefault(keys[tid], score)  # best first: a text's first score is its best
                if len(ranked) >= k or m == n:
                    # ties (one text under two origins) in the SQL path's order: score, sha, origin, scope, region
                    best = sorted(ranked.items(), key=lambda kv: (-kv[1], *(x or "" for x in kv[0])))[:k]
                    return _assemble(con, self.where, self.params, [(*key, v) for key, v in best])
                m = min(n, m * 4)


def _check_dim(con, db: Path, encoder: IndexEncoder) -> int:
    dim = _encoder_dim(con, db, encoder.identity)
    if dim != int(encoder.dim):
        raise Mv3dError(f"{db}: encoder {encoder.identity} is stored with dimension {dim}, but the loaded encoder "
                        f"gives {encoder.dim}; re-embed with `mv3d index-texts --rebuild`")
    return dim


def search(project_root: str | os.PathLike, query: str, *, encoder: str | IndexEncoder = DEFAULT_ENCODER, k: int = 5,
           scope: str | None = None, region: str | None = None, origins=None, device: str = "auto",
           db_path: str | os.PathLike | None = None) -> list[Hit]:
    """The ``k`` stored texts nearest to ``query`` (cosine), best first, identical texts merged.

    One query in one process (the CLI): DuckDB's own scan, grouped by text, answers it without
    loading the matrix (~60 ms over 100k x 384, where loading the matrix alone takes longer).
    Many queries: :class:`TextSearcher`."""
    if k < 1:
        raise ConfigError(f"-k must be at least 1 (got {k})")
    root = Path(project_root)
    db = Path(db_path) if db_path is not None else index_path(root)
    require_index(db)  # fail on a missing index before loading a model
    enc = resolve_encoder(encoder, project_root=root, device=device) if isinstance(encoder, str) else encoder
    where, params = _where(enc.identity, origins, scope, region)
    q = _encode_queries(enc, [query])[0].tolist()  # (E,)
    with open_index(db) as con:
        _check_dim(con, db, enc)
        ranked = con.execute(f"SELECT text_sha, origin, scope, region, max(list_inner_product(embedding, "
                             f"?::FLOAT[])) AS score FROM texts WHERE {where} GROUP BY ALL "
                             "ORDER BY score DESC, text_sha, origin, scope, region NULLS FIRST LIMIT ?",
                             [q, *params, k]).fetchall()
        return _assemble(con, where, params, ranked)



def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in lines + [fmt.format(*map(str, r)) for r in rows])


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_hits(hits: Sequence[Hit], width: int = 90) -> str:
    if not hits:
        return "no stored text matches these filters"
    rows = []
    for i, h in enumerate(hits, 1):
        more = f" +{len(h.volume_ids) - 1}" if len(h.volume_ids) > 1 else ""
        vols = h.volume_ids[0] + more if h.volume_ids else "-"
        rows.append([i, f"{h.score:.3f}", h.origin, h.region or h.label or "-", vols, _short(h.text, width)])
    return _table(["#", "score", "origin", "region/label", "volume", "text"], rows)


def format_stats(stats: dict[str, Any]) -> str:
    if not stats["rows"]:
        return f"{stats['path']}: empty"
    dims = {e["encoder"]: e["dim"] for e in stats["encoders"]}
    rows = [[g["encoder"], dims.get(g["encoder"], "?"), g["origin"], g["scope"], g["rows"], g["unique_texts"],
             g["truncated"]] for g in stats["groups"]]
    head = f"{stats['path']}: {stats['rows']} rows, {len(stats['encoders'])} encoder(s)\n"
    return head + _table(["encoder", "dim", "origin", "scope", "rows", "unique", "truncated"], rows)
