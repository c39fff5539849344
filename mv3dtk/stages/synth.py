"""``mv3d synth OUT``: a synthetic dataset in the real CT-RATE + RadGenome-ChestCT layout, or (``--dataset
totalseg``) in TotalSegmentator's."""

from __future__ import annotations

import click

from ..registry import Stage


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dataset", "dataset", type=click.Choice(["ctrate", "totalseg"]), default="ctrate", show_default=True,
              help="ctrate: CT-RATE + RadGenome (reports, labels, region masks); totalseg: TotalSegmentator "
                   "(<case>/ct.nii.gz, <case>/segmentations/<structure>.nii.gz, meta.csv) for segment-finetune.")
@click.option("--n-train", default=8, show_default=True, type=click.IntRange(min=1),
              help="Training scans (totalseg: the number of cases, split train / val / test by meta.csv).")
@click.option("--n-valid", default=4, show_default=True, type=click.IntRange(min=1),
              help="Validation scans (ctrate only).")
@click.option("--shape", nargs=3, type=int, default=(64, 128, 128), show_default=True, metavar="D H W",
              help="Voxels per volume: slices, rows, columns (benchmarks: 300 512 512).")
@click.option("--spacing", nargs=3, type=float, default=(3.0, 0.75, 0.75), show_default=True, metavar="Z Y X",
              help="Voxel size in mm.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--hu", type=click.Choice(["fixed", "raw"]), default="fixed", show_default=True,
              help="fixed: voxels are HU (CT-RATE v2); raw: HU+1024, rescale from the metadata CSV (v1). "
                   "ctrate only (TotalSegmentator stores HU).")
def command(out, dataset, n_train, n_valid, shape, spacing, seed, hu):
    """Write a deterministic synthetic CT-RATE + RadGenome dataset (volumes, reports, labels,
    metadata, region masks, region sentences, VQA) to OUT, or with --dataset totalseg a
    TotalSegmentator one (CT volumes, one mask per structure, meta.csv)."""
    from ..log import get_logger

    log = get_logger("synth")

    def progress(done: int, total: int) -> None:
        log.debug("synth: %d/%d volumes", done, total)

    try:
        if dataset == "totalseg":
            from ..data.synth_totalseg import make_synthetic_totalseg

            summary = make_synthetic_totalseg(out, n_train, shape=tuple(shape), spacing=tuple(spacing), seed=seed,
                                              progress=progress)
        else:
            from ..data.synth import make_synthetic_dataset

            summary = make_synthetic_dataset(out, n_train=n_train, n_valid=n_valid, shape=tuple(shape),
                                             spacing=tuple(spacing), seed=seed, hu=hu, progress=progress)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    log.info("wrote %s", summary)
    click.echo(str(summary.root))


STAGE = Stage(
    name="synth",
    command=command,
    summary="Write a synthetic CT-RATE + RadGenome (or TotalSegmentator) dataset (for tests, demo, benchmarks).",
    project=False,
)
