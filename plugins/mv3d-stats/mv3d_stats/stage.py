"""The ``stats`` stage: thin Click layer over :func:`mv3d_stats.compute.dataset_stats`.

Only click and mv3dtk are imported here; numpy, nibabel and matplotlib load when the stage runs,
so ``mv3d --help`` stays fast with this plugin installed.
"""

from __future__ import annotations

import click

from mv3dtk import Artifact, Mv3dError, Stage, StageContext, pass_stage_context


@click.command("stats")
@click.argument("source", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--max-volumes", default=16, show_default=True, type=click.IntRange(min=0),
              help="Volumes per split read for the HU histogram (evenly spread; 0 = none).")
@click.option("--hu-source", type=click.Choice(["auto", "raw", "fixed"]), default="auto", show_default=True,
              help="raw: apply the metadata CSV rescale; fixed: voxels are HU; auto: decide per volume.")
@pass_stage_context
def command(sctx: StageContext, source: str | None, max_volumes: int, hu_source: str) -> None:
    """Label prevalence, report length and HU histograms of a CT-RATE-layout dataset.

    SOURCE defaults to [paths] raw in the project's mv3d.toml. Writes stats/summary.csv and
    stats/stats.png.
    """
    from .compute import dataset_stats, write_outputs

    source = source or sctx.project.settings().get("paths", {}).get("raw")
    if not source:
        raise Mv3dError("no dataset given: pass SOURCE (a CT-RATE-layout folder) or set [paths] raw in mv3d.toml")
    stats = dataset_stats(source, max_volumes=max_volumes, hu_source=hu_source, log=sctx.log)
    write_outputs(stats, sctx.output_path("stats.summary"), sctx.output_path("stats.plot"))
    for split, labels in stats["labels"].items():
        sctx.log.info("%s: %d volumes, %d labelled", split, stats["n_volumes"][split], labels["n"])


STAGE = Stage(
    name="stats",
    command=command,
    summary="Dataset statistics: label prevalence, report length, HU histograms (CSV + PNG).",
    outputs=(
        Artifact("stats.summary", "stats/summary.csv", "long-format table: section, split, name, value"),
        Artifact("stats.plot", "stats/stats.png", "three panels: prevalence, report words, HU histogram"),
    ),
)
