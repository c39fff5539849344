"""``mv3d rewrite`` as a library function: reports and region sentences from ``prep/`` ->
presence/absence statements, through a backend, with a cache, retries, and a faithfulness guard.

Flow: collect the texts (deduplicated: reconstructions share a report), serve what the cache
holds, send the rest through a bounded pool of ``concurrency`` threads (each request retried with
exponential backoff on transient failures), store each reply in the cache as soon as it arrives
(main thread only), then label every LLM output with the rules labeler and compare it with its
source: an unfaithful output is flagged and, unless ``keep_flagged``, replaced by the rules
rewrite for training.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ..log import progress
from ..errors import ConfigError, Mv3dError
from ..fs import atomic_path
from .backends import RewriteBackend, TransientError, is_loopback
from .cache import ReplyCache, cache_key
from .labeler import compare, rules_rewrite
from .prompts import prompt_sha

SCOPES = ("reports", "regions")


@dataclass
class Item:
    scope: str  # "reports" | "regions"
    volume_id: str
    region: str | None
    anatomy: str | None
    source: str


@dataclass
class Reply:
    key: str
    output: str | None
    attempts: int
    seconds: float
    error: str | None = None


@dataclass
class RewriteSummary:
    items: int = 0
    unique: int = 0
    cached: int = 0
    requested: int = 0
    failed: int = 0
    flagged: int = 0
    seconds: float = 0.0
    flag_reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (f"rewrite: {self.items} texts ({self.unique} unique), {self.cached} from the cache, {self.requested} "
                f"requested, {self.failed} without a usable reply, {self.flagged} flagged and replaced, "
                f"{self.seconds:.1f} s")


def check_privacy(backend: RewriteBackend, allow_remote: bool) -> None:
    if backend.endpoint and not is_loopback(backend.endpoint) and not allow_remote:
        raise ConfigError(
            f"the {backend.name} backend would send reports (patient data) to {backend.endpoint}, which is not this "
            "machine; nothing was sent. Pass --allow-remote if that server may receive them, or use a local server "
            "(--host / --base-url http://127.0.0.1:PORT) or --backend rules"
        )


def collect_items(project_root: Path, scopes: tuple[str, ...], limit: int | None) -> list[Item]:
    items: list[Item] = []
    if "reports" in scopes:
        df = pl.read_parquet(project_root / "prep" / "volumes.parquet")
        df = df.filter((pl.col("status") == "ok") & pl.col("report").is_not_null()).sort("volume_id")
        rows = df.select("volume_id", "report").head(limit) if limit else df.select("volume_id", "report")
        items += [Item("reports", v, None, None, t) for v, t in rows.iter_rows()]
    if "regions" in scopes:
        df = pl.read_parquet(project_root / "prep" / "region_texts.parquet").filter(pl.col("region").is_not_null())
        df = df.sort("volume_id", "region", "anatomy")
        rows = df.head(limit) if limit else df
        items += [Item("regions", v, r, a, s) for v, r, a, s in rows.select(
            "volume_id", "region", "anatomy", "sentence").iter_rows()]
    return items


def _backoff(attempt: int) -> float:
    return min(30.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)


def request_with_retries(backend: RewriteBackend, key: str, text: str, retries: int,
                         stop: threading.Event) -> Reply:
    t0, error = time.monotonic(), None
    for attempt in range(retries + 1):
        if stop.is_set():
            break
        try:
            return Reply(key, backend.rewrite(text), attempt + 1, time.monotonic() - t0)
        except TransientError as e:
            error = str(e)
            if attempt < retries:
                stop.wait(_backoff(attempt))
    return Reply(key, None, retries + 1, time.monotonic() - t0, error or "stopped")


def send_all(backend: RewriteBackend, todo: dict[str, str], cache: ReplyCache, psha: str, *, concurrency: int,
             retries: int, log: logging.Logger) -> dict[str, Reply]:
    """Send ``todo`` (key -> text) with at most ``concurrency`` requests in flight; each reply goes
    into the cache as soon as it arrives."""
    replies: dict[str, Reply] = {}
    stop = threading.Event()
    tick, close = progress(len(todo), "rewrite", log)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rewrite")
    pending = {pool.submit(request_with_retries, backend, k, t, retries, stop): k for k, t in todo.items()}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                del pending[fut]
                reply = fut.result()  # a BackendError stops the run here
                replies[reply.key] = reply
                if reply.output is not None:
                    cache.put(reply.key, backend.name, backend.model, psha, todo[reply.key], reply.output,
                              reply.attempts, reply.seconds)
                else:
                    log.warning("no usable reply after %d attempts: %s", reply.attempts, reply.error)
                tick()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        close()
    return replies


def _guard(items: list[Item], outputs: dict[str, Reply | str], keys: list[str], backend: RewriteBackend,
           keep_flagged: bool, summary: RewriteSummary) -> list[dict]:
    rows, psha = [], prompt_sha()
    for item, key in zip(items, keys):
        out = outputs.get(key)
        text = out.output if isinstance(out, Reply) else out
        reasons = [] if backend.name == "rules" or text is None else compare(item.source, text)
        if text is None:
            reasons = [f"no usable reply ({out.error if isinstance(out, Reply) else 'not sent'})"]
        flagged = bool(reasons)
        for r in reasons:
            kind = r.split(" ", 1)[0]
            summary.flag_reasons[kind] = summary.flag_reasons.get(kind, 0) + 1
        enriched = text if not flagged or (keep_flagged and text) else rules_rewrite(item.source)
        rows.append({"volume_id": item.volume_id, "region": item.region, "anatomy": item.anatomy,
                     "source": item.source, "enriched": enriched, "llm_output": text if backend.name != "rules" else None,
                     "backend": backend.name, "model": backend.model, "prompt_sha": psha if backend.name != "rules"
                     else None, "flagged": flagged, "flag_reason": "; ".join(reasons) or None, "scope": item.scope})
        summary.flagged += flagged
    return rows


def _write(rows: list[dict], path: Path, region_columns: bool) -> None:
    cols = ["volume_id"] + (["region", "anatomy"] if region_columns else []) + [
        "source", "enriched", "llm_output", "backend", "model", "prompt_sha", "flagged", "flag_reason"]
    schema = {c: (pl.Boolean if c == "flagged" else pl.String) for c in cols}
    df = pl.DataFrame([{c: r[c] for c in cols} for r in rows], schema=schema, orient="row")
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def run_rewrite(project_root: Path, backend: RewriteBackend, *, scopes: tuple[str, ...] = SCOPES,
                concurrency: int = 4, retries: int = 3, limit: int | None = None, allow_remote: bool = False,
                keep_flagged: bool = False, log: logging.Logger | None = None) -> RewriteSummary:
    log = log or logging.getLogger("mv3d.rewrite")
    t0 = time.time()
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ConfigError(f"--scope {','.join(scopes)}: use reports, regions or both (comma-separated)")
    check_privacy(backend, allow_remote)
    items = collect_items(project_root, scopes, limit)
    psha = prompt_sha()
    keys = [cache_key(backend.name, backend.model, psha, it.source) for it in items]
    texts = dict(zip(keys, (it.source for it in items)))
    summary = RewriteSummary(items=len(items), unique=len(texts))
    cache = ReplyCache(project_root / "rewrite" / "cache.duckdb")
    try:
        if backend.name == "rules":  # offline and deterministic: nothing to send or cache
            outputs: dict = {k: backend.rewrite(t) for k, t in texts.items()}
        else:
            outputs = cache.get_many(list(texts))
            summary.cached = len(outputs)
            todo = {k: t for k, t in texts.items() if k not in outputs}
            log.info("rewrite: %d unique texts, %d cached, %d to send to %s with %d in flight", len(texts),
                     len(outputs), len(todo), backend.describe(), concurrency)
            replies = send_all(backend, todo, cache, psha, concurrency=concurrency, retries=retries, log=log)
            summary.requested = len(todo)
            summary.failed = sum(r.output is None for r in replies.values())
            outputs.update(replies)
    finally:
        cache.close()
    rows = _guard(items, outputs, keys, backend, keep_flagged, summary)
    out = project_root / "rewrite"
    if "reports" in scopes:
        _write([r for r in rows if r["scope"] == "reports"], out / "reports.parquet", region_columns=False)
    if "regions" in scopes:
        _write([r for r in rows if r["scope"] == "regions"], out / "region_texts.parquet", region_columns=True)
    summary.seconds = time.time() - t0
    if summary.unique and summary.failed == summary.requested and summary.requested > 0:
        raise Mv3dError(f"no request to {backend.describe()} succeeded ({summary.failed} failed); is the server "
                        "running? The outputs fall back to the rules rewrite; rerun once it is up (cached replies "
                        "are kept)")
    return summary
