"""``mv3d segment-finetune``: the MedVista3D-UniMiSS encoder with an STU-Net-B decoder, trained inside nnU-Net v2
(export -> plan -> mv3dPlans variant -> nnUNetTrainer_mv3d -> model/ -> per-class Dice)."""

from __future__ import annotations

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context
from ..seg.options import SegmentOptions
from ._config import click_options


@click.command("segment-finetune")
@click_options(SegmentOptions)
@click.option("--json", "json_", is_flag=True, help="Print the metrics as JSON on stdout (the table goes to stderr).")
@pass_stage_context
def command(sctx: StageContext, json_: bool, **options):
    """Fine-tune a pretrained UniMiSS encoder with an STU-Net-B decoder for organ segmentation, in nnU-Net v2's
    framework (its raw format, plans, trainer class and predictor). Defaults are the paper's (lr 5e-5, batch 2,
    128^3 patches, 1,000 epochs, fold 0 of nnU-Net's 5-fold split); writes segment/<run>/ with model/,
    metrics.json, per_class.csv and the nnU-Net folders."""
    import contextlib
    import sys

    from ..eval.runs import default_run_name, resolve_model_dir
    from ..launch import run_name
    from ..seg.run import run_segment_finetune
    from ._options import publish

    opts, root = SegmentOptions(**options), sctx.project.root
    if opts.resume and not opts.run_name:
        raise click.UsageError("--resume needs the --run NAME of the run to continue")
    name = opts.run_name or default_run_name(resolve_model_dir(root, opts.model), f"seg-fold{opts.fold}")
    run_dir = root / "segment" / run_name(name, "segment")
    sctx.log.info("segment-finetune -> %s", run_dir)
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its progress: stdout stays for --json
        summary = run_segment_finetune(root, run_dir, opts, sctx.log)
    sctx.record_output("segment.model", run_dir / "model")
    publish(sctx, "segment.run", run_dir, summary, format_table(summary), json_)


def format_table(summary: dict) -> str:
    """Per-class Dice, then the mean, as a terminal table."""
    rows = [(name, "-" if c["dice"] != c["dice"] else f"{c['dice']:.3f}", str(c["cases"]))
            for name, c in summary["per_class"].items()]
    rows.append(("mean DSC", f"{summary['mean_dice']:.3f}", str(summary["n_cases"])))
    w = max(len(r[0]) for r in rows + [("structure",)])
    head = f"{'structure':<{w}}  {'Dice':>6}  cases"
    return "\n".join([f"fold {summary['fold']} validation, init {summary['init']}", head, "-" * len(head)]
                     + [f"{a:<{w}}  {b:>6}  {c:>5}" for a, b, c in rows])


STAGE = Stage(
    name="segment-finetune",
    command=command,
    summary="Fine-tune the UniMiSS encoder + STU-Net-B decoder inside nnU-Net v2 (organ segmentation, per-class Dice).",
    outputs=(Artifact("segment.model", "segment", "model/ of the latest segmentation run (network.safetensors, "
                      "plans.json, dataset.json)", optional=True),
             Artifact("segment.run", "segment", "metrics.json, per_class.csv, per_case.csv of the latest run",
                      optional=True)),
    lock=lambda p: f"segment-finetune.{p.get('run_name') or 'new'}",
)
