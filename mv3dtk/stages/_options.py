"""Options and the closing step shared by the evaluation stages (zeroshot, retrieve, and the coming
vqa-eval and prognosis): written once here, so every eval stage spells them the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import click

PRECISIONS = ("bf16", "fp32")


def _stack(*options: Callable) -> Callable[[Callable], Callable]:
    def decorate(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def eval_inputs(split_help: str = "Split of prep/volumes.parquet to evaluate.") -> Callable[[Callable], Callable]:
    """``--model`` (default: the project's latest pretrained model) and ``--split``."""
    return _stack(
        click.option("--model", "model_dir", help="Saved model directory, e.g. pretrain/<run>/model "
                                                  "[default: the project's latest pretrained model]."),
        click.option("--split", default="valid", show_default=True, help=split_help),
    )


def eval_runtime(task: str) -> Callable[[Callable], Callable]:
    """How the volumes are encoded (``--batch-size``, ``--workers``, ``--device``, ``--precision``),
    the run folder under ``task/`` (``--run``) and ``--json``."""
    return _stack(
        click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
                     help="Volumes per forward."),
        click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="Data loader workers."),
        click.option("--device", help="cpu, cuda or cuda:N [default: cuda when available]."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True,
                     help="bf16 autocast on GPU (CPU always runs fp32)."),
        click.option("--run", "run_name", help=f"Run name (folder under {task}/) [default: <model run>-<split>-<time>]."),
        click.option("--json", "json_", is_flag=True,
                     help="Print the metrics as JSON on stdout (the table goes to stderr)."),
    )


def publish(sctx, artifact: str, run_dir: Path, summary: dict, table: str, as_json: bool) -> None:
    """Record the run as the stage's artifact, point ``<task>/latest`` at it, and print the table
    (stderr when ``--json`` puts the summary on stdout)."""
    from ..eval.runs import point_latest

    sctx.record_output(artifact, run_dir)
    point_latest(run_dir)
    click.echo(table, err=as_json)
    if as_json:
        click.echo(json.dumps({**summary, "run_dir": str(run_dir)}))
