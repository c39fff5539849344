"""``mv3d retrieve``: report -> volume recall@k, volume -> volume MAP@k and region phrase grounding,
each beside a random-embedding baseline (CT-CLIP's protocols)."""

from __future__ import annotations

import click

from ..runs import StageContext, pass_stage_context
from ._options import eval_options, eval_run, eval_stage, publish


@click.command("retrieve")
@eval_options(
    "retrieve",
    click.option("--tasks", default="report,volume,region", show_default=True,
                 help="Comma list: report (report -> volume), volume (volume -> volume), region (phrase grounding)."),
    click.option("-k", "ks", default="5,10,50,100", show_default=True, help="k of report -> volume recall@k."),
    click.option("--volume-k", default="1,5,10,50", show_default=True, help="k of volume -> volume MAP@k."),
    click.option("--grounding-k", default="10,50", show_default=True, help="k of region grounding top-k."),
    click.option("--index/--no-index", "use_index", default=True, show_default=True,
                 help="Reuse report embeddings of this model from index/texts.duckdb when present."),
    split_help="Split of prep/volumes.parquet (the whole split is the pool).",
    seed_help="Seed of the random-embedding baseline.",
)
@pass_stage_context
def command(sctx: StageContext, model_dir, split, tasks, ks, volume_k, grounding_k, use_index, seed, batch_size,
            workers, device, precision, run_name, json_):
    """Retrieval on a whole split: report -> volume recall@k, volume -> volume MAP@k by label
    Jaccard, region phrase grounding top-k, with random baselines; writes retrieve/<run>/."""
    from ..eval.retrieval import format_table, run_retrieve

    root, model_path, run_dir = eval_run(sctx, "retrieve", model_dir, run_name, split)
    summary = run_retrieve(root, model_path, run_dir, split=split, tasks=tasks, ks=ks, volume_ks=volume_k,
                           grounding_ks=grounding_k, seed=seed, batch_size=batch_size, workers=workers,
                           device=device, precision=precision, use_index=use_index, log=sctx.log)
    publish(sctx, "retrieve.run", run_dir, summary, format_table(summary), json_)


STAGE = eval_stage("retrieve", command,
                   "Report -> volume recall@k, volume -> volume MAP@k, region grounding, with random baselines.",
                   "metrics.json, rankings.parquet")
