"""``rewrite/cache.duckdb``: every finished LLM request, keyed by
``sha256(backend, model, prompt hash, text)``. Written by one thread, row by row, so a run killed at
any moment keeps all it finished and a rerun sends nothing twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb

from ..errors import Mv3dError

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key VARCHAR PRIMARY KEY,
    backend VARCHAR, model VARCHAR, prompt_sha VARCHAR,
    source VARCHAR, output VARCHAR,
    attempts INTEGER, seconds DOUBLE, created TIMESTAMP DEFAULT current_timestamp
)
"""


def cache_key(backend: str, model: str, prompt_sha: str, text: str) -> str:
    return hashlib.sha256("\x1f".join((backend, model, prompt_sha, text)).encode()).hexdigest()


class ReplyCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(path))
        except duckdb.IOException as e:
            raise Mv3dError(f"{path} is in use by another process ({e}); wait for it to finish") from e
        self.con.execute(SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        rows = self.con.execute("SELECT key, output FROM replies WHERE key IN (SELECT unnest(?))", [keys]).fetchall()
        return dict(rows)

    def put(self, key: str, backend: str, model: str, prompt_sha: str, source: str, output: str, attempts: int,
            seconds: float) -> None:
        self.con.execute("INSERT OR REPLACE INTO replies (key, backend, model, prompt_sha, source, output, attempts, "
                         "seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [key, backend, model, prompt_sha, source, output, attempts, seconds])

    def count(self) -> int:
        return self.con.execute("SELECT count(*) FROM replies").fetchall()[0][0]

    def close(self) -> None:
        self.con.close()
