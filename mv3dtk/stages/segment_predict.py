"""``mv3d segment-predict``: segment CT volumes with a ``segment/<run>/model`` through nnU-Net's predictor."""

from __future__ import annotations

import click

from ..registry import Stage
from ..runs import StageContext, pass_stage_context


@click.command("segment-predict")
@click.argument("inputs", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--run", "run_name", help="The segment-finetune run whose model/ to use [default: the latest].")
@click.option("--model", "model_dir", type=click.Path(file_okay=False),
              help="A segmentation model folder instead of --run (network.safetensors, plans.json, dataset.json).")
@click.option("--device", help="cuda or cpu [default: cuda when available].")
@click.option("--hu-source", type=click.Choice(["auto", "raw", "fixed"]), default="auto", show_default=True,
              help="Units of the inputs: auto reads the voxels and subtracts 1024 from raw-stored (HU + 1024) ones; "
                   "raw always subtracts it; fixed takes them as HU.")
@click.option("--mirroring/--no-mirroring", default=True, show_default=True,
              help="nnU-Net's test-time mirroring (about 8x the compute in 3D).")
@click.option("--overwrite", is_flag=True, help="Segment again volumes whose label map exists in OUT_DIR.")
@pass_stage_context
def command(sctx: StageContext, inputs, out_dir, run_name, model_dir, device, hu_source, mirroring, overwrite):
    """Segment every CT volume of INPUTS (a folder of *.nii.gz / *.nii in HU, or one file) into
    OUT_DIR/<case>.nii.gz on the input's geometry. A volume that fails is reported and skipped; a rerun
    segments only the missing ones."""
    import contextlib
    import sys
    from pathlib import Path

    from ..errors import ConfigError, DataError
    from ..seg.predict import predict_folder

    root = sctx.project.root
    if model_dir is not None and run_name is not None:
        raise click.UsageError("give --run or --model, not both")
    if model_dir is not None:
        model = Path(model_dir) if Path(model_dir).is_dir() else root / model_dir
    elif run_name is not None:
        model = root / "segment" / run_name / "model"
    else:
        found = sctx.project.artifact_path("segment.model")
        if found is None:
            raise ConfigError("no segmentation model in the project: run mv3d segment-finetune, or pass --model")
        model = found
    source = Path(inputs)
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's own prints
        report = predict_folder(model, [source] if source.is_file() else source, out_dir, device=device,
                                hu_source=hu_source, mirroring=mirroring, overwrite=overwrite, log=sctx.log,
                                progress=lambda d, n: sctx.log.info("%d/%d segmented", d, n))
    click.echo(f"{len(report.written)} segmented, {len(report.existing)} already there, {len(report.skipped)} "
               f"skipped -> {out_dir}")
    if report.skipped and not report.written and not report.existing:
        raise DataError("no volume could be segmented: " + "; ".join(list(report.skipped.values())[:3]))


STAGE = Stage(
    name="segment-predict",
    command=command,
    summary="Segment CT volumes with a segment-finetune model (nnU-Net's predictor; label maps on the input grid).",
)
