"""``mv3d index-texts``: embed reports, enriched reports, region sentences and zero-shot prompts
into ``index/texts.duckdb``; ``search`` and ``stats`` read it.

    mv3d -P DIR index-texts [--encoder default|DIR|pretrain/<run>/model] [--origins report,region,...]
    mv3d -P DIR index-texts search "mild pleural thickening" [-k 5] [--scope local] [--json]
    mv3d -P DIR index-texts stats [--json]
"""

from __future__ import annotations

import json

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context

ORIGINS_HELP = "report, enriched, region, region_enriched, prompt"
ENCODER_HELP = ("'default' (offline all-MiniLM-L6-v2), a Hugging Face model directory, or a trained mv3d model: "
                "pretrain/<run>/model (its projected text tower).")


def _project():
    from ..project import Project

    return Project(click.get_current_context().find_root().obj.project).require()


@click.group("index-texts", invoke_without_command=True)
@click.option("--encoder", default="default", show_default=True, help=ENCODER_HELP)
@click.option("--origins", help=f"Comma list of what to embed: {ORIGINS_HELP} [default: all; the rewrite "
                                "origins only where `mv3d rewrite` has run].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Texts per forward.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
@click.option("--rebuild", is_flag=True, help="Drop this encoder's stored embeddings and embed everything again.")
@click.option("--json", "json_", is_flag=True, help="Print the build summary as JSON to stdout.")
@pass_stage_context
def command(sctx: StageContext, encoder, origins, batch_size, device, rebuild, json_):
    """Embed every report, enriched report, region sentence, enriched region sentence and zero-shot
    prompt once per encoder into index/texts.duckdb (incremental). Subcommands search and stats
    read the index."""
    from ..index import build_index

    summary = build_index(sctx.project.root, encoder=encoder, origins=origins, batch_size=batch_size, device=device,
                          rebuild=rebuild, log=sctx.log)
    sctx.log.info("%s", summary.line())
    if json_:
        click.echo(json.dumps(summary.as_dict(), indent=2))


@command.command("search")
@click.argument("query")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(min=1), help="How many texts to show.")
@click.option("--scope", type=click.Choice(["global", "local"]), help="Reports and prompts (global) or region "
                                                                      "sentences (local).")
@click.option("--region", help="Only this region's sentences (a name of prep/regions.json, e.g. lung).")
@click.option("--origin", "origins", help=f"Comma list among {ORIGINS_HELP}.")
@click.option("--encoder", help="The encoder whose embeddings to search (it also embeds the query) [default: "
                                "the build's, from [stages.index-texts] in mv3d.toml, else 'default'].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--json", "json_", is_flag=True, help="Print the hits as JSON to stdout.")
def search_command(query, k, scope, region, origins, encoder, device, json_):
    """The stored texts nearest to QUERY by cosine similarity, with their scores (read-only)."""
    from ..index import format_hits, search

    build_defaults = click.get_current_context().parent.default_map or {}
    encoder = encoder or build_defaults.get("encoder") or "default"
    hits = search(_project().root, query, encoder=encoder, k=k, scope=scope, region=region, origins=origins,
                  device=device)
    click.echo(json.dumps([h.as_dict() for h in hits], indent=2) if json_ else format_hits(hits))


@command.command("stats")
@click.option("--json", "json_", is_flag=True, help="Print JSON to stdout.")
def stats_command(json_):
    """Rows per encoder, origin and scope (read-only)."""
    from ..index import format_stats, index_path, index_stats

    stats = index_stats(index_path(_project().root))
    click.echo(json.dumps(stats, indent=2) if json_ else format_stats(stats))


STAGE = Stage(
    name="index-texts",
    command=command,
    summary="Embed reports, region sentences and prompts into a DuckDB index; semantic search.",
    inputs=("prep.manifest", "prep.region_texts"),
    outputs=(Artifact("index.texts", "index/texts.duckdb", "text embeddings per encoder (DuckDB, table texts)"),),
)
