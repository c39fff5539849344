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

Modules, one job each: :mod:`.store` (schema, opening, writing rows, reading embeddings back),
:mod:`.collect` (which texts a project holds), :mod:`.build` (embedding what is new),
:mod:`.search` (search and the CLI's tables).
"""

from .build import BuildSummary, build_index, write_embeddings
from .collect import collect_texts, select_origins
from .search import Hit, TextSearcher, format_hits, format_stats, search
from .store import (INDEX_PATH, ORIGINS, SCOPES, TextItem, fetch_embeddings, index_path, index_stats, load_matrix,
                    make_item, open_index, open_writer, parse_origins, register_encoder, text_id, text_sha,
                    writer_lock)

__all__ = ["BuildSummary", "Hit", "INDEX_PATH", "ORIGINS", "SCOPES", "TextItem", "TextSearcher", "build_index",
           "collect_texts", "fetch_embeddings", "format_hits", "format_stats", "index_path", "index_stats",
           "load_matrix", "make_item", "open_index", "open_writer", "parse_origins", "register_encoder", "search",
           "select_origins", "text_id", "text_sha", "write_embeddings", "writer_lock"]
