"""The index file: schema, opening it (readers read-only, one writer under a lock), writing rows, and
reading embeddings back (:func:`load_matrix`, :func:`fetch_embeddings`) and counts (:func:`index_stats`)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import torch

from ..errors import ConfigError, DataError, MissingInputError, Mv3dError
from ..fs import FileLock
from ..text.encoders import IndexEncoder

INDEX_PATH = "index/texts.duckdb"
SCHEMA_VERSION = 1
ORIGINS = ("report", "enriched", "region", "region_enriched", "prompt")
SCOPES = ("global", "local")
ORIGIN_SCOPE = {"report": "global", "enriched": "global", "region": "local", "region_enriched": "local",
                "prompt": "global"}
REWRITE_FILES = {"enriched": "rewrite/reports.parquet", "region_enriched": "rewrite/region_texts.parquet"}
ITEM_COLUMNS = ("text_id", "volume_id", "scope", "region", "origin", "label", "text", "text_sha")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS encoders (
    encoder VARCHAR PRIMARY KEY, dim INTEGER NOT NULL, kind VARCHAR, name VARCHAR, max_length INTEGER,
    created TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS texts (
    text_id VARCHAR NOT NULL, encoder VARCHAR NOT NULL, volume_id VARCHAR, scope VARCHAR NOT NULL,
    region VARCHAR, origin VARCHAR NOT NULL, label VARCHAR, text VARCHAR NOT NULL, text_sha VARCHAR NOT NULL,
    truncated BOOLEAN NOT NULL, embedding FLOAT[] NOT NULL, PRIMARY KEY (text_id, encoder));
"""


def index_path(project_root: str | os.PathLike) -> Path:
    return Path(project_root) / INDEX_PATH


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def text_id(origin: str, volume_id: str | None, region: str | None, text: str) -> str:
    """The stable id of one text of the project (the same under every encoder)."""
    key = "\x1f".join((origin, volume_id or "", region or "", text))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]




@dataclass(frozen=True)
class TextItem:
    text_id: str
    volume_id: str | None
    scope: str
    region: str | None
    origin: str
    label: str | None
    text: str
    text_sha: str


def make_item(origin: str, text: str, volume_id: str | None = None, region: str | None = None,
              label: str | None = None) -> TextItem:
    return TextItem(text_id(origin, volume_id, region, text), volume_id, ORIGIN_SCOPE[origin], region, origin,
                    label, text, text_sha(text))



def parse_origins(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"report,region"`` / ``["report"]`` -> validated tuple; None/empty -> None (all)."""
    if value is None:
        return None
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s and s.strip()]
    bad = [n for n in names if n not in ORIGINS]
    if bad:
        raise ConfigError(f"unknown origin {', '.join(map(repr, bad))}; choose from {','.join(ORIGINS)}")
    return tuple(dict.fromkeys(names)) or None


# --------------------------------------------------------------------------- opening the file


def _connect(db: Path, *, read_only: bool, wait: float) -> "duckdb.DuckDBPyConnection":
    """Open the index, retrying for ``wait`` s while another process holds DuckDB's file lock."""

    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(str(db), read_only=read_only)
        except duckdb.IOException as e:
            msg = str(e)
            if "lock" in msg.lower() and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if "lock" in msg.lower():
                raise Mv3dError(f"{db} is open in another process ({msg.split(':', 1)[-1].strip()}); wait for "
                                "that process (an index-texts build, a search, a training run reading it) to "
                                "finish, then retry") from None
            raise DataError(f"{db} cannot be opened ({msg}); delete it and run `mv3d index-texts` again") from None


def _writer_lock(db: Path) -> FileLock:
    return FileLock(db.parent / f".{db.name}.lock", f"the text index {db}")


def require_index(db_path: str | os.PathLike) -> Path:
    """``db_path`` if it exists and no writer holds it, else a clear error (cheap: no connection)."""
    db = Path(db_path)
    if not db.is_file():
        raise MissingInputError(f"there is no text index at {db}; build it with: mv3d -P {db.parent.parent} "
                                "index-texts")
    lock = _writer_lock(db)
    if lock.is_held():
        who = lock.path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
        raise Mv3dError(f"{db} is being written by {who}; wait for that build to finish, then retry")
    return db


@contextmanager
def open_index(db_path: str | os.PathLike, *, wait: float = 5.0) -> Iterator["duckdb.DuckDBPyConnection"]:
    """A read-only connection to an existing index (closed on exit)."""
    db = require_index(db_path)
    con = _connect(db, read_only=True, wait=wait)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not {"texts", "encoders", "meta"} <= tables:
            raise DataError(f"{db} is not an mv3d text index (tables {sorted(tables)}); delete it and run "
                            "`mv3d index-texts` again")
        _check_version(con, db)
        yield con
    finally:
        con.close()


def writer_lock(db_path: str | os.PathLike, *, wait: float = 0.0) -> FileLock:
    """The lock every writer of the index holds (acquired): another writer waits ``wait`` s for it,
    then fails with a message naming the holder."""
    db = Path(db_path)
    return _writer_lock(db).acquire(holder=f"mv3d index-texts (pid {os.getpid()} on {socket.gethostname()})",
                                    timeout=wait)


@contextmanager
def _open_rw(db: Path, wait: float) -> Iterator["duckdb.DuckDBPyConnection"]:
    db.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(db, read_only=False, wait=max(wait, 10.0))  # readers hold the file only briefly
    try:
        con.execute(SCHEMA)
        _check_version(con, db)
        con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        yield con
        con.execute("CHECKPOINT")
    finally:
        con.close()


@contextmanager
def open_writer(db_path: str | os.PathLike, *, wait: float = 0.0) -> Iterator["duckdb.DuckDBPyConnection"]:
    """The single writer: :func:`writer_lock`, then a read-write connection with the schema in place.
    For :func:`register_encoder` and :func:`write_embeddings`."""
    db = Path(db_path)
    db.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(db, wait=wait), _open_rw(db, wait) as con:
        yield con


def _check_version(con, db: Path) -> None:
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    if row and int(row[0][0]) > SCHEMA_VERSION:
        raise Mv3dError(f"{db} was written by a newer mv3d (schema {row[0][0]} > {SCHEMA_VERSION}); upgrade mv3d")


@contextmanager
def _transaction(con) -> Iterator[None]:
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


# --------------------------------------------------------------------------- writing


def _arrow_items(items: Sequence[TextItem]) -> "pa.Table":
    return pa.table({c: pa.array([getattr(it, c) for it in items], pa.string()) for c in ITEM_COLUMNS})


def _arrow_rows(items: Sequence[TextItem], emb, truncated: Sequence[bool], encoder: str) -> "pa.Table":
    """Rows for ``texts``: items + (N, E) float32 numpy embeddings as a list column (no Python floats)."""

    n, dim = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int64))
    lists = pa.LargeListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(emb, np.float32).reshape(-1)))
    table = _arrow_items(items)
    return (table.append_column("encoder", pa.array([encoder] * n, pa.string()))
            .append_column("truncated", pa.array(list(truncated), pa.bool_()))
            .append_column("embedding", lists))


def _insert(con, rows: "pa.Table") -> None:
    con.register("new_rows", rows)
    try:
        columns = "text_id, encoder, volume_id, scope, region, origin, label, text, text_sha, truncated"
        con.execute(f"INSERT OR REPLACE INTO texts ({columns}, embedding) "
                    f"SELECT {columns}, embedding::FLOAT[] FROM new_rows")
    finally:
        con.unregister("new_rows")


def register_encoder(con, enc: IndexEncoder, *, rebuild: bool = False, db: Path | None = None) -> int:
    """Record ``enc`` in ``encoders``; its dimension must match the rows already stored for the same
    identity (``rebuild`` drops them instead). Returns how many rows ``rebuild`` dropped."""
    ident, dim = enc.identity, int(enc.dim)
    stored, rows = con.execute("SELECT (SELECT len(embedding) FROM texts WHERE encoder = $e LIMIT 1), "
                               "(SELECT count(*) FROM texts WHERE encoder = $e)", {"e": ident}).fetchall()[0]
    if rows and stored != dim and not rebuild:
        raise Mv3dError(f"{db or 'the index'} holds {rows} embeddings of dimension {stored} for encoder {ident}, "
                        f"but that encoder now gives {dim}-d vectors. Re-embed them with `mv3d index-texts "
                        "--rebuild` (same --encoder), or delete the index file")
    if rebuild:
        con.execute("DELETE FROM texts WHERE encoder = ?", [ident])
    # (re)register: a row without embeddings (a build that failed before its first commit) takes the new dim
    con.execute("INSERT OR REPLACE INTO encoders (encoder, dim, kind, name, max_length) VALUES (?, ?, ?, ?, ?)",
                [ident, dim, getattr(enc, "kind", None), getattr(enc, "name", None), getattr(enc, "max_length", None)])
    return int(rows) if rebuild else 0



def _identity(encoder: "str | IndexEncoder") -> str:
    return encoder if isinstance(encoder, str) else encoder.identity


def _encoder_dim(con, db: Path, ident: str) -> int:
    row = con.execute("SELECT dim FROM encoders WHERE encoder = ?", [ident]).fetchall()
    if row:
        return int(row[0][0])
    known = [r[0] for r in con.execute("SELECT encoder FROM encoders ORDER BY encoder").fetchall()]
    raise MissingInputError(f"{db} has no embeddings made by encoder {ident} (it has: {', '.join(known) or 'none'}); "
                            "embed the texts with that encoder first: mv3d index-texts --encoder <same encoder>")


def _where(ident: str, origins=None, scope=None, region=None) -> tuple[str, list]:
    sql, params = ["encoder = ?"], [ident]
    origins = parse_origins(origins)
    if origins:
        sql.append(f"origin IN ({', '.join('?' for _ in origins)})")
        params += list(origins)
    if scope is not None:
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}; choose global or local")
        sql.append("scope = ?")
        params.append(scope)
    if region is not None:
        sql.append("region = ?")
        params.append(region)
    return " AND ".join(sql), params


def _matrix(table: "pa.Table", dim: int, column: str = "embedding") -> "torch.Tensor":
    """The list column of ``table`` -> (N, dim) float32 tensor (one copy, no Python floats)."""

    col = table.column(column).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    if values.size != table.num_rows * dim:
        raise DataError(f"the index holds embeddings whose length is not {dim}; run `mv3d index-texts --rebuild`")
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(table.num_rows, dim))  # (N, E)


def load_matrix(db_path: str | os.PathLike, encoder: "str | IndexEncoder", *, origins=None, scope: str | None = None,
                region: str | None = None) -> tuple[list[str], list[str], "torch.Tensor"]:
    """``(text_ids, texts, embeddings (N, E))`` of ``encoder`` (its identity string, or an encoder),
    filtered by origins / scope / region, ordered by text_id. E.g. the RSMB warm start:
    ``load_matrix(db, model.text_identity, origins=("enriched", "region_enriched"))``."""
    db = Path(db_path)
    ident = _identity(encoder)
    with open_index(db) as con:
        dim = _encoder_dim(con, db, ident)
        where, params = _where(ident, origins, scope, region)
        tbl = con.sql(f"SELECT text_id, text, embedding FROM texts WHERE {where} ORDER BY text_id",
                      params=params).to_arrow_table()
    return tbl.column("text_id").to_pylist(), tbl.column("text").to_pylist(), _matrix(tbl, dim)


def fetch_embeddings(db_path: str | os.PathLike, encoder: "str | IndexEncoder", ids: Sequence[str], *,
                     strict: bool = True) -> "torch.Tensor":
    """(len(ids), E) embeddings of ``ids`` made by ``encoder``, in the order of ``ids``. A missing id
    raises (``strict``) or gives a row of NaN (find them with ``emb.isnan().any(1)``)."""

    db, ident = Path(db_path), _identity(encoder)
    with open_index(db) as con:
        dim = _encoder_dim(con, db, ident)
        con.register("wanted", pa.table({"text_id": pa.array(list(ids), pa.string()),
                                         "pos": pa.array(np.arange(len(ids), dtype=np.int64))}))
        tbl = con.sql("SELECT w.pos, t.embedding FROM wanted w JOIN texts t ON t.text_id = w.text_id "
                      "AND t.encoder = $e", params={"e": ident}).to_arrow_table()
        con.unregister("wanted")
    out = torch.full((len(ids), dim), float("nan"))  # (N, E)
    if tbl.num_rows:
        out[torch.from_numpy(tbl.column("pos").to_numpy().copy())] = _matrix(tbl, dim)
    missing = len(ids) - tbl.num_rows
    if strict and missing:
        raise MissingInputError(f"{missing} of {len(ids)} texts are not in {db} for encoder {ident} (the index is "
                                "older than the texts); run: mv3d index-texts --encoder <same encoder>")
    return out


def index_stats(db_path: str | os.PathLike) -> dict[str, Any]:
    """Rows per (encoder, origin, scope), with unique texts and truncated counts, plus the encoders."""
    db = Path(db_path)
    with open_index(db) as con:
        enc_rows = con.execute("SELECT encoder, dim, kind, name, max_length FROM encoders ORDER BY encoder").fetchall()
        group_rows = con.execute("SELECT encoder, origin, scope, count(*), count(DISTINCT text_sha), "
                                 "count(*) FILTER (truncated) FROM texts GROUP BY ALL ORDER BY ALL").fetchall()
    encoders = [dict(zip(("encoder", "dim", "kind", "name", "max_length"), r)) for r in enc_rows]
    groups = [dict(zip(("encoder", "origin", "scope", "rows", "unique_texts", "truncated"), r)) for r in group_rows]
    for e in encoders:
        e["rows"] = sum(g["rows"] for g in groups if g["encoder"] == e["encoder"])
    return {"path": str(db), "rows": sum(g["rows"] for g in groups), "encoders": encoders, "groups": groups}


