"""``mv3d prep SOURCE``: CT-RATE / RadGenome / CSV -> preprocessed volumes, masks and tables."""

from __future__ import annotations

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context


def _lock(params: dict) -> str:
    shard = params.get("shard")
    return f"prep.shard-{shard.replace('/', '-of-')}" if shard else "prep"


@click.command("prep")
@click.argument("source", type=click.Path(exists=True))
@click.option("--layout", type=click.Choice(["auto", "ctrate", "radgenome", "csv"]), default="auto", show_default=True,
              help="Dataset layout (auto: detect).")
@click.option("--splits", default="train,valid", show_default=True, help="Comma list of splits to ingest.")
@click.option("--spacing", nargs=3, type=float, default=(3.0, 1.0, 1.0), show_default=True, metavar="Z Y X",
              help="Target voxel size in mm (D, H, W).")
@click.option("--size", nargs=3, type=click.IntRange(min=1), default=(96, 320, 320), show_default=True,
              metavar="D H W", help="Centre crop / pad to this many voxels.")
@click.option("--hu", nargs=2, type=float, default=(-1000.0, 1000.0), show_default=True, metavar="LO HI",
              help="HU window mapped to [-1, 1].")
@click.option("--hu-source", type=click.Choice(["auto", "raw", "fixed"]), default="auto", show_default=True,
              help="raw: apply the metadata CSV rescale (CT-RATE v1); fixed: voxels are HU (v2, *_fixed); "
                   "auto: decide per volume and record it.")
@click.option("--grid", type=click.Choice(["ctclip", "monai"]), default="ctclip", show_default=True,
              help="Sampling grid: ctclip = half-voxel centres (F.interpolate, CT-CLIP's loader); monai = "
                   "first voxel centre kept (MONAI Spacingd).")
@click.option("--masks", type=click.Path(exists=True, file_okay=False),
              help="Folder of RadGenome region masks seg_<volume>/<region>.nii.gz (default: found in SOURCE).")
@click.option("--region-texts", type=click.Path(exists=True, dir_okay=False),
              help="RadGenome region-sentence CSV (default: found in SOURCE).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Parallel processes.")
@click.option("--shard", metavar="I/N", help="Process only shard I of N (0-based), e.g. a SLURM array task; "
                                             "a later plain run merges the shards.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N volumes (sorted by name).")
@click.option("--keep-going", is_flag=True, help="Exit 0 even if some volumes failed (they stay in the table).")
@pass_stage_context
def command(sctx: StageContext, source, layout, splits, spacing, size, hu, hu_source, grid, masks, region_texts, workers,
            shard, limit, keep_going):
    """Ingest CT-RATE, RadGenome-ChestCT or a CSV of your own volumes: reorient, resample, window
    HU, crop/pad; masks as bitmasks; reports and labels joined (paper defaults: 3x1x1 mm,
    96x320x320, HU [-1000, 1000])."""
    from ..data.ingest import PrepOptions, parse_shard, run_prep
    from ..errors import Mv3dError

    if hu[0] >= hu[1]:
        raise Mv3dError(f"--hu {hu[0]:g} {hu[1]:g}: LO must be below HI")
    if min(spacing) <= 0:
        raise Mv3dError("--spacing: every voxel size must be positive")
    wanted = tuple(s.strip() for s in splits.split(",") if s.strip())
    opts = PrepOptions(spacing=tuple(spacing), size=tuple(size), hu=tuple(hu), hu_source=hu_source, grid=grid)
    shard_t = parse_shard(shard)
    summary = run_prep(source, sctx.project.root, layout=layout, splits=wanted, options=opts, masks=masks,
                       region_texts=region_texts, workers=workers, shard=shard_t, limit=limit, log=sctx.log)
    sctx.log.info("%s", summary.line())
    if shard_t:
        sctx.mark_partial(f"shard {shard}: run a plain 'mv3d prep' afterwards to merge the shards")
    if summary.failed and not keep_going:
        first = "\n  ".join(f"{v}: {e}" for v, e in summary.failed[:5])
        raise Mv3dError(
            f"{len(summary.failed)} of {summary.total} volumes failed (all are listed in prep/volumes.parquet, "
            f"column 'error'):\n  {first}\nFix them and rerun (finished volumes are skipped), or pass --keep-going "
            "to accept the failures"
        )


STAGE = Stage(
    name="prep",
    command=command,
    summary="Ingest CT-RATE / RadGenome / CSV volumes: reorient, resample, window, masks, reports, labels.",
    outputs=(
        Artifact("prep.volumes", "prep/volumes", "float16 (D, H, W) volumes in [-1, 1]"),
        Artifact("prep.masks", "prep/masks", "uint16 (D, H, W) region bitmasks"),
        Artifact("prep.manifest", "prep/volumes.parquet", "one row per volume"),
        Artifact("prep.region_texts", "prep/region_texts.parquet", "region sentences"),
        Artifact("prep.regions", "prep/regions.json", "bit k of the masks <-> region k"),
    ),
    lock=_lock,
    creates_project=True,
)
