"""``mv3d rewrite``: reports and region sentences -> presence/absence statements (LLM or rules)."""

from __future__ import annotations

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context


@click.command("rewrite")
@click.option("--backend", default="rules", show_default=True,
              help="rules (offline, deterministic), ollama, openai, or a plugin's (mv3d.rewriters entry points).")
@click.option("--model", help="LLM name (ollama default: llama3.1:8b; openai: required).")
@click.option("--host", help="Ollama server (default: $OLLAMA_HOST, else http://127.0.0.1:11434).")
@click.option("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM) or "
                                 "http://127.0.0.1:11434/v1 (Ollama). Key: $OPENAI_API_KEY only.")
@click.option("--scope", default="reports,regions", show_default=True, help="What to rewrite: reports, regions.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256), help="Requests in flight.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds/request.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
              help="Retries of a failed request (exponential backoff).")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--allow-remote", is_flag=True, help="Allow sending reports to a server that is not this machine.")
@click.option("--keep-flagged", is_flag=True,
              help="Keep unfaithful LLM rewrites for training instead of replacing them by the rules rewrite.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N texts of each scope.")
@pass_stage_context
def command(sctx: StageContext, backend, model, host, base_url, scope, concurrency, timeout, retries, temperature,
            seed, allow_remote, keep_flagged, limit):
    """Rewrite every report and region sentence into discrete presence/absence statements with an
    LLM (checked against the rules labeler) or the offline rules labeler."""
    from ..text.backends import create_backend
    from ..text.rewrite import run_rewrite

    impl = create_backend(backend, model=model, host=host, base_url=base_url, timeout=timeout,
                          temperature=temperature, seed=seed)
    scopes = tuple(s.strip() for s in scope.split(",") if s.strip())
    summary = run_rewrite(sctx.project.root, impl, scopes=scopes, concurrency=concurrency, retries=retries,
                          limit=limit, allow_remote=allow_remote, keep_flagged=keep_flagged, log=sctx.log)
    sctx.log.info("%s", summary.line())
    if summary.flag_reasons:
        sctx.log.info("flags: %s", ", ".join(f"{k} {v}" for k, v in sorted(summary.flag_reasons.items())))


STAGE = Stage(
    name="rewrite",
    command=command,
    summary="Rewrite reports and region sentences into presence/absence statements (LLM or rules).",
    inputs=("prep.manifest", "prep.region_texts"),
    outputs=(
        Artifact("rewrite.reports", "rewrite/reports.parquet", "volume_id, source, enriched, ...", optional=True),
        Artifact("rewrite.region_texts", "rewrite/region_texts.parquet", "per region sentence", optional=True),
        Artifact("rewrite.cache", "rewrite/cache.duckdb", "LLM replies by sha256(backend, model, prompt, text)"),
    ),
)
