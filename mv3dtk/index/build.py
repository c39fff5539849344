"""Building the index: embed what is new for an encoder (each distinct text once, in chunks that are
committed as they finish, so a killed build resumes), and drop rows whose text left the project."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, Mv3dError
from ..log import get_logger, progress
from ..text.encoders import DEFAULT_ENCODER, IndexEncoder, resolve_encoder
from .collect import collect_texts, select_origins
from .store import (TextItem, _arrow_items, _arrow_rows, _insert, _matrix, _open_rw, _transaction, index_path,
                    register_encoder, writer_lock)

def _check_output(enc: IndexEncoder, emb: "torch.Tensor", n: int) -> None:
    if tuple(emb.shape) != (n, int(enc.dim)):
        raise Mv3dError(f"encoder {enc.identity} returned shape {tuple(emb.shape)} for {n} texts, not ({n}, "
                        f"{enc.dim}); fix the encoder (its .dim and .encode must agree)")
    norms = emb.norm(dim=1) if n else torch.ones(0)
    if not torch.isfinite(emb).all() or (norms - 1).abs().max().item() > 1e-3:
        raise Mv3dError(f"encoder {enc.identity} returned vectors that are not finite unit vectors; an index "
                        "encoder must L2-normalise its output")


@dataclass
class BuildSummary:
    encoder: str
    dim: int
    origins: tuple[str, ...]
    texts: dict[str, int] = field(default_factory=dict)  # per origin, non-empty
    empty: dict[str, int] = field(default_factory=dict)  # per origin, skipped
    new_rows: int = 0
    encoded: int = 0  # unique texts sent through the encoder
    reused: int = 0  # new rows whose text was already embedded by this encoder
    truncated: int = 0  # new rows whose text exceeded the encoder's max_length
    removed: int = 0  # stale rows of the built origins (all encoders)
    dropped: int = 0  # rows of this encoder removed by rebuild
    encode_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def texts_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def line(self) -> str:
        per = ", ".join(f"{o} {self.texts.get(o, 0)}" for o in self.origins)
        return (f"index-texts: {sum(self.texts.values())} texts ({per}); {self.new_rows} new rows, {self.encoded} "
                f"encoded ({self.texts_per_s:.1f} texts/s), {self.reused} reused, {sum(self.empty.values())} empty "
                f"skipped, {self.truncated} truncated, {self.removed} stale removed; encoder {self.encoder} "
                f"({self.dim}-d); {self.seconds:.1f} s")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "texts_per_s": round(self.texts_per_s, 2)}


def _plan(con, enc: IndexEncoder, items: Sequence[TextItem], origins: Sequence[str]):
    """Remove stale rows; return (new items, {text_sha: (embedding, truncated)} reusable)."""

    con.register("cur", _arrow_items(items))
    try:
        marks = ", ".join("?" for _ in origins)
        removed = con.execute(f"DELETE FROM texts WHERE origin IN ({marks}) AND text_id NOT IN "
                              "(SELECT text_id FROM cur)", list(origins)).fetchall()[0][0] if origins else 0
        new_ids = {r[0] for r in con.execute("SELECT text_id FROM cur WHERE text_id NOT IN "
                                             "(SELECT text_id FROM texts WHERE encoder = ?)",
                                             [enc.identity]).fetchall()}
        new = [it for it in items if it.text_id in new_ids]
        con.register("new_items", _arrow_items(new))
        tbl = con.sql("SELECT text_sha, any_value(truncated) AS truncated, any_value(embedding) AS embedding "
                      "FROM texts WHERE encoder = $e AND text_sha IN (SELECT text_sha FROM new_items) "
                      "GROUP BY text_sha", params={"e": enc.identity}).to_arrow_table()
        con.unregister("new_items")
    finally:
        con.unregister("cur")
    emb = _matrix(tbl, int(enc.dim)).numpy() if tbl.num_rows else np.zeros((0, int(enc.dim)), np.float32)
    shas, trunc = tbl.column("text_sha").to_pylist(), tbl.column("truncated").to_pylist()
    return int(removed), new, {s: (emb[i], t) for i, (s, t) in enumerate(zip(shas, trunc))}


def write_embeddings(con, enc: IndexEncoder, items: Sequence[TextItem], emb, truncated: Sequence[bool]) -> None:
    """Insert (or replace) rows: ``items`` (see :func:`make_item`) with their (N, E) embeddings by
    ``enc``, in one transaction. ``con`` comes from :func:`open_writer`, where
    :func:`register_encoder` has accepted ``enc``."""

    emb = np.asarray(emb, dtype=np.float32)
    if emb.shape != (len(items), int(enc.dim)) or len(truncated) != len(items):
        raise ValueError(f"embeddings {emb.shape} / {len(truncated)} flags do not match {len(items)} items x "
                         f"{enc.dim}")
    dim = con.execute("SELECT dim FROM encoders WHERE encoder = ?", [enc.identity]).fetchall()
    if dim != [(int(enc.dim),)]:
        raise ValueError(f"encoder {enc.identity} ({enc.dim}-d) is not registered as such; call register_encoder")
    if items:
        with _transaction(con):
            _insert(con, _arrow_rows(items, emb, truncated, enc.identity))


def _encode_batches(enc: IndexEncoder, texts: list[str], batch_size: int, tick) -> "torch.Tensor":
    """(n, E) embeddings of ``texts`` in input order, encoded longest first in batches of similar
    length (less padding), the progress bar advanced after every batch."""

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), int(enc.dim))  # (n, E)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        emb = enc.encode([texts[i] for i in idx], batch_size=batch_size)  # (b, E)
        _check_output(enc, emb, len(idx))
        out[torch.tensor(idx)] = emb
        for _ in idx:
            tick()
    return out


def _encode_new(con, enc: IndexEncoder, new: list[TextItem], reuse: dict, s: BuildSummary, *, batch_size: int,
                chunk: int, log) -> None:
    """Rows whose text is stored already go in first; the rest are encoded ``chunk`` unique texts at a
    time, each chunk committed with its rows."""

    ready = [it for it in new if it.text_sha in reuse]
    write_embeddings(con, enc, ready, np.stack([reuse[it.text_sha][0] for it in ready]) if ready else
                     np.zeros((0, int(enc.dim)), np.float32), [reuse[it.text_sha][1] for it in ready])
    s.reused, s.new_rows, s.truncated = len(ready), len(ready), sum(reuse[it.text_sha][1] for it in ready)
    by_sha: dict[str, list[TextItem]] = {}
    for it in new:
        if it.text_sha not in reuse:
            by_sha.setdefault(it.text_sha, []).append(it)
    groups = list(by_sha.values())  # one group of rows per unique text, first-seen order
    tick, close = progress(len(groups), "encoding texts", log)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(groups), chunk):
            part = groups[start:start + chunk]
            texts = [g[0].text for g in part]
            emb = _encode_batches(enc, texts, batch_size, tick).numpy()  # (n, E)
            long = [n > enc.max_length for n in enc.n_tokens(texts)]
            index = np.repeat(np.arange(len(part)), [len(g) for g in part])  # row -> its text
            write_embeddings(con, enc, [it for g in part for it in g], emb[index], [long[i] for i in index])
            s.encoded += len(texts)
            s.new_rows += len(index)
            s.truncated += sum(long[i] for i in index)
    finally:
        close()
        s.encode_seconds = time.perf_counter() - t0


def build_index(project_root: str | os.PathLike, *, encoder: str | IndexEncoder = DEFAULT_ENCODER,
                origins: str | Sequence[str] | None = None, batch_size: int = 64, device: str = "auto",
                rebuild: bool = False, chunk: int = 2048, wait: float = 0.0, db_path: str | os.PathLike | None = None,
                log=None) -> BuildSummary:
    """Embed the project's texts of ``origins`` (default: all that exist) with ``encoder`` (a spec for
    :func:`~mv3dtk.text.encoders.resolve_encoder` or an encoder object) into ``index/texts.duckdb``.
    Incremental and resumable; see the module docstring."""
    t0 = time.perf_counter()
    root, log = Path(project_root), log or get_logger("index-texts")
    if batch_size < 1 or chunk < 1:
        raise ConfigError(f"batch size ({batch_size}) and chunk ({chunk}) must be at least 1")
    chosen = select_origins(root, origins, log)
    items, empty = collect_texts(root, chosen)
    for origin, n in empty.items():
        if n:
            log.warning("%d empty %s texts skipped", n, origin)
    db = Path(db_path) if db_path is not None else index_path(root)
    db.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(db, wait=wait):  # before loading the model: a second writer fails fast
        enc = resolve_encoder(encoder, project_root=root, device=device) if isinstance(encoder, str) else encoder
        s = BuildSummary(enc.identity, int(enc.dim), chosen, empty=empty)
        for it in items:
            s.texts[it.origin] = s.texts.get(it.origin, 0) + 1
        with _open_rw(db, wait) as con:
            with _transaction(con):
                s.dropped = register_encoder(con, enc, rebuild=rebuild, db=db)
                s.removed, new, reuse = _plan(con, enc, items, chosen)
            log.info("%s: %d texts, %d rows to add (encoder %s, %d-d)", db, len(items), len(new), enc.identity,
                     enc.dim)
            _encode_new(con, enc, new, reuse, s, batch_size=batch_size, chunk=chunk, log=log)
    if s.truncated:
        log.warning("%d texts were longer than %d tokens and were truncated for %s", s.truncated,
                    enc.max_length, enc.name)
    s.seconds = time.perf_counter() - t0
    return s


# --------------------------------------------------------------------------- reading
