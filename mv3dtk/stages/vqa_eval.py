"""``mv3d vqa-eval``: answer CT-CHAT's VQA turns with a trained ``vqa/<run>/model`` (greedy, turn by turn)
and score them per task with CT-CHAT's metrics; or ``--ask`` one question about one volume."""

from __future__ import annotations

import json

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context

TASKS = "long,short,mc,report"
LATEST = "vqa/latest-eval"  # a link to the latest evaluation folder


@click.command("vqa-eval")
@click.option("--run", "run_name", help="The vqa-train run to evaluate (vqa/<run>/model) [default: the latest].")
@click.option("--split", default="valid", show_default=True, help="Evaluate the items whose volume is in this split.")
@click.option("--tasks", default=TASKS, show_default=True,
              help="Comma list of tasks: long (free response, description, conversation), short, mc (multiple "
                   "choice), report (report generation).")
@click.option("--max-new-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Longest answer, in tokens (CT-CHAT: 512).")
@click.option("--vqa", multiple=True, help="VQA JSON sources [default: the run's --vqa].")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N conversations.")
@click.option("--ask", nargs=2, metavar="VOLUME_ID QUESTION", help="Ask one question about one prepped volume.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
              help="Conversations decoded together.")
@click.option("--device", help="cpu, cuda or cuda:N [default: cuda when available].")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16 on GPU (CPU always runs fp32).")
@click.option("--json", "json_", is_flag=True, help="Print the metrics as JSON on stdout (the table goes to stderr).")
@pass_stage_context
def command(sctx: StageContext, run_name, split, tasks, max_new_tokens, vqa, limit, ask, batch_size, device, precision,
            json_):
    """Score a VQA run on a split: BLEU-1, METEOR, ROUGE-L and CIDEr per task (pycocoevalcap on raw strings,
    as CT-CHAT), multiple-choice and yes/no accuracy; writes vqa/<run>/eval-<split>/."""
    from ..eval.runs import parse_choices, point_latest
    from ..vqa.evaluate import run_vqa_eval
    from ..vqa.evaluate import ask as ask_one
    from ..vqa.metrics import TASKS as ALL
    from ..vqa.report import format_table, resolve_vqa_model

    root = sctx.project.root
    model_dir = resolve_vqa_model(root, run_name)
    if ask:
        answer = ask_one(root, model_dir, ask[0], ask[1], max_new_tokens=max_new_tokens, device=device,
                         precision=precision, log=sctx.log)
        click.echo(json.dumps({"volume_id": ask[0], "question": ask[1], "answer": answer}) if json_ else answer)
        return
    chosen = parse_choices(tasks, ALL, "--tasks")
    out = model_dir.parent / f"eval-{split}"
    summary = run_vqa_eval(root, model_dir, out, split=split, tasks=chosen, max_new_tokens=max_new_tokens, vqa=vqa,
                           batch_size=batch_size, device=device, precision=precision, limit=limit, log=sctx.log)
    point_latest(out, root / LATEST)  # what the manifest's vqa-eval.run names, even after an --ask
    sctx.record_output("vqa-eval.run", out)
    click.echo(format_table(summary), err=json_)
    if json_:
        click.echo(json.dumps({**summary, "run_dir": str(out)}))


STAGE = Stage(
    name="vqa-eval",
    command=command,
    summary="Evaluate a VQA run per task (BLEU-1, METEOR, ROUGE-L, CIDEr, MC accuracy), or --ask a question.",
    inputs=("prep.manifest", "prep.volumes"),
    outputs=(Artifact("vqa-eval.run", LATEST, "metrics.json, per_task.csv, predictions.jsonl of the latest VQA "
                      "evaluation", optional=True),),
    lock=lambda p: f"vqa-eval.{p.get('run_name') or 'latest'}",
)
