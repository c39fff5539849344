"""``mv3d synth OUT``: a synthetic dataset in the real CT-RATE + RadGenome-ChestCT layout."""

from __future__ import annotations

import click

from ..registry import Stage


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n-train", default=8, show_default=True, type=click.IntRange(min=1), help="Training scans.")
@click.option("--n-valid", default=4, show_default=True, type=click.IntRange(min=1), help="Validation scans.")
@click.option("--shape", nargs=3, type=int, default=(64, 128, 128), show_default=True, metavar="D H W",
              help="Voxels per volume: slices, rows, columns (benchmarks: 300 512 512).")
@click.option("--spacing", nargs=3, type=float, default=(3.0, 0.75, 0.75), show_default=True, metavar="Z Y X",
              help="Voxel size in mm.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--hu", type=click.Choice(["fixed", "raw"]), default="fixed", show_default=True,
              help="fixed: voxels are HU (CT-RATE v2); raw: HU+1024, rescale from the metadata CSV (v1).")
def command(out, n_train, n_valid, shape, spacing, seed, hu):
    """Write a deterministic synthetic CT-RATE + RadGenome dataset (volumes, reports, labels,
    metadata, region masks, region sentences, VQA) to OUT."""
    from ..data.synth import make_synthetic_dataset
    from ..log import get_logger

    log = get_logger("synth")

    def progress(done: int, total: int) -> None:
        log.debug("synth: %d/%d volumes", done, total)

    try:
        summary = make_synthetic_dataset(out, n_train=n_train, n_valid=n_valid, shape=tuple(shape),
                                         spacing=tuple(spacing), seed=seed, hu=hu, progress=progress)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    log.info("wrote %s", summary)
    click.echo(str(summary.root))


STAGE = Stage(
    name="synth",
    command=command,
    summary="Write a synthetic CT-RATE + RadGenome dataset (for tests, demo, benchmarks).",
    project=False,
)
