"""What the evaluation stages share (zeroshot, retrieve, and the coming vqa-eval and prognosis): their
options, written once here so that every eval stage spells them the same way, and the closing step
that records the run and prints its table."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from ..registry import Artifact, Stage

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


EVAL_INPUTS = ("prep.manifest", "prep.volumes", "prep.regions", "prep.region_texts")


def eval_stage(name: str, command: click.Command, summary: str, files: str, inputs=EVAL_INPUTS) -> Stage:
    """The :class:`Stage` of an evaluation stage: its artifact ``<name>.run`` is the latest run folder
    (``files`` says what is in it), and runs under different ``--run`` names may go at once."""
    return Stage(name=name, command=command, summary=summary, inputs=inputs,
                 outputs=(Artifact(f"{name}.run", name, f"{files} of the latest run", optional=True),),
                 lock=lambda p: f"{name}.{p.get('run_name') or 'new'}")


def eval_run(sctx, task: str, model_dir: str | None, run_name: str | None, split: str) -> tuple[Path, Path, Path]:
    """-> (project root, the model to evaluate, the run folder ``<task>/<run>``), logged."""
    from ..eval.runs import resolve_model_dir, run_folder

    root = sctx.project.root
    model_path = resolve_model_dir(root, model_dir)
    run_dir = run_folder(root, task, run_name, model_path, split)
    sctx.log.info("%s of %s on %s -> %s", task, model_path, split, run_dir)
    return root, model_path, run_dir
