"""``index/texts.duckdb``: every report, enriched report, region sentence, enriched region sentence
and zero-shot prompt of a project, embedded once per encoder (DESIGN §4).

Tables::

    texts     text_id, encoder, volume_id, scope, region, origin, label, text, text_sha, truncated,
              embedding FLOAT[]                        PRIMARY KEY (text_id, encoder)
    encoders  encoder (identity), dim, kind, name, max_length, created
    meta      key, value (schema_version)

* ``text_id`` = sha256(origin, volume_id, region, text)[:32]: a stable key of the *text*, the same
  under every encoder, so a rebuild keeps every row whose text did not change, and other stages
  compute the ids of the texts they want (:func:`text_id`) and fetch them for their encoder
  (:func:`fetch_embeddings`). The same text under two encoders is two rows: hence the primary key
  (text_id, encoder) rather than text_id alone.
* ``embedding`` is ``FLOAT[]``, not ``FLOAT[N]``: one file holds the 384-d default encoder next to
  a 64..768-d mv3d model, and a fixed-size column has one N. ``encoders.dim`` fixes N per encoder
  and every write checks it. For DuckDB's array functions cast: ``embedding::FLOAT[384]``.
* Incremental: only rows whose (text_id, encoder) is new are written, and only texts whose
  (text hash, encoder) is not stored yet are encoded (a report shared by reconstructions is encoded
  once). Rows of the built origins whose text left the project are removed, for every encoder.
* Writers hold a :class:`~mv3dtk.fs.FileLock` next to the file (a second writer waits ``wait``
  seconds, then fails with a clear message) and commit every ``chunk`` texts, so a killed build
  keeps what it committed and a rerun resumes. Readers open the file read-only.
* Search, two paths over the same rows, giving the same hits (benchmarks/index.py, 100k x 384 on
  the 2-core CI machine): one query in a fresh process (``mv3d index-texts search``, :func:`search`)
  is DuckDB's own scan grouped by text (150-200 ms on a new connection), cheaper than loading the
  matrix into torch first (0.3-1 s); many queries (:class:`TextSearcher`) load the filtered matrix
  into torch once and then cost one matmul + topk each (~15 ms, a few ms per query in a batch),
  where DuckDB's single-threaded scan pays 60-200 ms for every query. Bulk users (retrieval, the
  RSMB warm start) use :func:`load_matrix` / :func:`fetch_embeddings` the same way.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import ConfigError, DataError, MissingInputError, Mv3dError
from ..fs import FileLock
from ..log import get_logger, progress
from .encoders import DEFAULT_ENCODER, IndexEncoder, resolve_encoder

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa
    import torch

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


# --------------------------------------------------------------------------- the texts of a project


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


def select_origins(project_root: Path, origins: Sequence[str] | None, log=None) -> tuple[str, ...]:
    """The origins to build. Left out (None), the rewrite origins are skipped with a warning when
    ``mv3d rewrite`` has not run; asked for explicitly, their absence is an error."""
    log = log or get_logger("index-texts")
    explicit = parse_origins(origins)
    chosen = []
    for origin in explicit or ORIGINS:
        rel = REWRITE_FILES.get(origin)
        if rel and not (project_root / rel).is_file():
            if explicit:
                raise MissingInputError(f"origin '{origin}' needs {rel}, which does not exist; run: "
                                        f"mv3d -P {project_root} rewrite (or leave '{origin}' out of --origins)")
            log.warning("%s is missing: origin '%s' skipped (run `mv3d rewrite` to index enriched texts)", rel, origin)
            continue
        chosen.append(origin)
    return tuple(chosen)


def _rows(path: Path, columns: list[str], where=None) -> list[tuple]:
    import polars as pl

    if not path.is_file():
        raise MissingInputError(f"{path} is missing; run the stage that writes it (mv3d prep / mv3d rewrite)")
    try:
        df = pl.read_parquet(path, columns=columns)
    except Exception as e:  # polars raises several types for a torn or foreign file
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun the stage that writes it") from e
    if where is not None:
        df = df.filter(where)
    return list(df.sort(columns[:2]).iter_rows())


def _source_rows(root: Path, origin: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
    """(volume_id, region, label, text) of one origin, text possibly empty or None."""
    import polars as pl

    from ..eval.prompts import ctclip_prompts

    if origin == "report":
        rows = _rows(root / "prep/volumes.parquet", ["volume_id", "report", "status"], pl.col("status") == "ok")
        return [(v, None, None, t) for v, t, _ in rows]
    if origin == "enriched":
        return [(v, None, None, t) for v, t in _rows(root / REWRITE_FILES[origin], ["volume_id", "enriched"])]
    if origin == "region":  # sentences that prep could not assign to a region are not region texts
        rows = _rows(root / "prep/region_texts.parquet", ["volume_id", "region", "sentence"],
                     pl.col("region").is_not_null())
        return [(v, r, None, t) for v, r, t in rows]
    if origin == "region_enriched":
        rows = _rows(root / REWRITE_FILES[origin], ["volume_id", "region", "enriched"], pl.col("region").is_not_null())
        return [(v, r, None, t) for v, r, t in rows]
    return [(None, None, p.label, text) for p in ctclip_prompts() for text in (p.positive, p.negative)]


def collect_texts(project_root: str | os.PathLike, origins: Sequence[str] = ORIGINS
                  ) -> tuple[list[TextItem], dict[str, int]]:
    """The texts of ``origins`` in the project (unique by text_id) and, per origin, how many
    empty texts were skipped."""
    root, items, empty = Path(project_root), {}, {}
    for origin in origins:
        empty[origin] = 0
        for volume_id, region, label, text in _source_rows(root, origin):
            if text is None or not str(text).strip():
                empty[origin] += 1
                continue
            item = make_item(origin, str(text), volume_id, region, label)
            items.setdefault(item.text_id, item)
    return list(items.values()), empty


# --------------------------------------------------------------------------- opening the file


def _connect(db: Path, *, read_only: bool, wait: float) -> "duckdb.DuckDBPyConnection":
    """Open the index, retrying for ``wait`` s while another process holds DuckDB's file lock."""
    import duckdb

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
    import pyarrow as pa

    return pa.table({c: pa.array([getattr(it, c) for it in items], pa.string()) for c in ITEM_COLUMNS})


def _arrow_rows(items: Sequence[TextItem], emb, truncated: Sequence[bool], encoder: str) -> "pa.Table":
    """Rows for ``texts``: items + (N, E) float32 numpy embeddings as a list column (no Python floats)."""
    import numpy as np
    import pyarrow as pa

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


def _check_output(enc: IndexEncoder, emb: "torch.Tensor", n: int) -> None:
    import torch

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
    import numpy as np

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
    import numpy as np

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
    import torch

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
    import numpy as np

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
    import numpy as np
    import torch

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
    import numpy as np
    import pyarrow as pa
    import torch

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
    import torch

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
        import pyarrow as pa

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


# --------------------------------------------------------------------------- text output for the CLI


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
