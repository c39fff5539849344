"""``mv3d pretrain``: MedVista3D pretraining from prep (and rewrite) outputs, on one process or
under torchrun (``--nproc N`` launches ``torchrun --standalone`` itself)."""

from __future__ import annotations

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context
from ..train.options import PretrainOptions
from ._config import click_options
from ._launch import launch_or_run


@click.command("pretrain")
@click_options(PretrainOptions)
@pass_stage_context
def command(sctx: StageContext, **options):
    """Pretrain MedVista3D (global + local + semantic alignment) on prep's volumes and masks, the
    report and region sentences, and rewrite's enriched texts. Defaults are the paper's."""
    from ..launch import run_name
    from ..train.pretrain import run_pretraining, train_config

    opts, root = PretrainOptions(**options), sctx.project.root
    cfg = train_config(root, opts)
    run = run_name(opts.run_name, opts.backbone)
    run_dir = root / "pretrain" / run
    launch_or_run(sctx, "pretrain", opts, run, lambda: run_pretraining(root, run_dir, cfg, opts.resume, sctx.log,
                                                                       opts.report_to))
    if sctx.dist.is_main:
        sctx.record_output("pretrain.model", run_dir / "model")


STAGE = Stage(
    name="pretrain",
    command=command,
    summary="Pretrain MedVista3D (ViT or UniMiSS) with global, local and semantic alignment; torchrun-ready.",
    inputs=("prep.manifest", "prep.volumes", "prep.regions"),
    outputs=(Artifact("pretrain.model", "pretrain", "the final model/ of the latest run (loadable)", optional=True),),
    lock=lambda p: f"pretrain.{p.get('run_name') or 'new'}",
)
