"""What the evaluation stages share (zeroshot, retrieve, and the coming vqa-eval and prognosis): their
options, written once here so that every eval stage spells them the same way, and the closing step
that records the run and prints its table."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import click

Decorator = Callable[[Callable], Callable]

PRECISIONS = ("bf16", "fp32")


def eval_options(task: str, *own: Decorator, split: str = "valid",
                 split_help: str = "Split of prep/volumes.parquet to evaluate.",
                 seed_help: str | None = None, model_help: str = "pretrain/<run>/model",
                 before_run: Sequence[Decorator] = ()) -> Decorator:
    """One eval stage's options, in this order (the order of ``--help``): ``--model``, ``--split``,
    the stage's ``own`` options, ``--seed`` (when ``seed_help`` says what it seeds), ``--batch-size``,
    ``--workers``, ``--device``, ``--precision``, the ``before_run`` options, ``--run`` (a folder
    under ``task/``) and ``--json``. Besides its own, the callback receives ``model_dir``, ``split``,
    (``seed``), ``batch_size``, ``workers``, ``device``, ``precision``, ``run_name`` and ``json_``.

    ``split`` is the default split; ``model_help`` the example model directory in ``--model``'s help.
    """
    seed = () if seed_help is None else (
        click.option("--seed", default=0, show_default=True, type=int, help=seed_help),)
    stack = (
        click.option("--model", "model_dir", help=f"Saved model directory, e.g. {model_help} "
                                                  "[default: the project's latest pretrained model]."),
        click.option("--split", default=split, show_default=True, help=split_help),
        *own,
        *seed,
        click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
                     help="Volumes per forward."),
        click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Data loader workers."),
        click.option("--device", help="cpu, cuda or cuda:N [default: cuda when available]."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True,
                     help="bf16 autocast on GPU (CPU always runs fp32)."),
        *before_run,
        click.option("--run", "run_name",
                     help=f"Run name (folder under {task}/) [default: <model run>-<split>-<time>]."),
        click.option("--json", "json_", is_flag=True,
                     help="Print the metrics as JSON on stdout (the table goes to stderr)."),
    )

    def decorate(f: Callable) -> Callable:
        for option in reversed(stack):  # the last decorator applied is the first option listed
            f = option(f)
        return f

    return decorate


def publish(sctx, artifact: str, run_dir: Path, summary: dict, table: str, as_json: bool) -> None:
    """Record the run as the stage's artifact, point ``<task>/latest`` at it, and print the table
    (stderr when ``--json`` puts the summary on stdout)."""
    from ..eval.runs import point_latest

    sctx.record_output(artifact, run_dir)
    point_latest(run_dir)
    click.echo(table, err=as_json)
    if as_json:
        click.echo(json.dumps({**summary, "run_dir": str(run_dir)}))
