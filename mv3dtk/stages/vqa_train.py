"""``mv3d vqa-train``: MedVista3D-LLaVA, a frozen encoder's cached tokens -> MLP-GELU projector -> a local
Llama, trained in LLaVA's two stages (projector alone, then LoRA + projector); torchrun-ready."""

from __future__ import annotations

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context
from ..vqa.options import VqaTrainOptions
from ._config import click_options
from ._launch import launch_or_run


@click.command("vqa-train")
@click_options(VqaTrainOptions)
@pass_stage_context
def command(sctx: StageContext, **options):
    """Train the VQA / report-generation model on cached image tokens: stage 1 tunes the projector on
    volume-report pairs, stage 2 LoRA-tunes the LLM and the projector on CT-CHAT conversations.
    Defaults are CT-CHAT's, which the paper follows; writes vqa/<run>/."""
    from ..launch import run_name
    from ..vqa.train import run_vqa_training

    opts, root = VqaTrainOptions(**options), sctx.project.root
    run = run_name(opts.run_name, "vqa")
    run_dir = root / "vqa" / run
    launch_or_run(sctx, "vqa-train", opts, run, lambda: run_vqa_training(root, run_dir, opts, sctx.log))
    if sctx.dist.is_main:
        sctx.record_output("vqa.model", run_dir / "model")


STAGE = Stage(
    name="vqa-train",
    command=command,
    summary="Train MedVista3D-LLaVA (projector, then LoRA on a local Llama) for VQA and report generation.",
    inputs=("prep.manifest", "prep.volumes"),
    outputs=(Artifact("vqa.model", "vqa", "the final model/ of the latest VQA run (projector, adapter, vqa.json)",
                      optional=True),),
    lock=lambda p: f"vqa-train.{p.get('run_name') or 'new'}",
)
