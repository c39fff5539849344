"""``mv3d pretrain``: MedVista3D pretraining from prep (and rewrite) outputs, on one process or
under torchrun (``--nproc N`` launches ``torchrun --standalone`` itself)."""

from __future__ import annotations

import click

from ..registry import Artifact, Stage
from ..runs import StageContext, pass_stage_context

DEFAULT_CONFIG = {"vit": "vit-b", "unimiss": "unimiss-small"}
PAPER_BATCH = {"vit": 32, "unimiss": 20}


@click.command("pretrain")
@click.option("--backbone", type=click.Choice(["vit", "unimiss"]), default="vit", show_default=True)
@click.option("--model-config", help="Config name (vit-b, unimiss-small, vit-tiny, unimiss-tiny) or JSON path "
                                     "[default: the backbone's paper config].")
@click.option("--text-encoder", default="default", show_default=True,
              help="'default' (the config's), 'minilm', a local model directory or a cached HF repo id.")
@click.option("--freeze-text", is_flag=True,
              help="Keep the text tower as loaded and train only its projection (its features are computed once "
                   "per distinct text: several times faster on CPU and for small datasets).")
@click.option("--global-text", type=click.Choice(["report", "enriched", "statement", "mixed", "statements"]),
              default="report", show_default=True,
              help="What the global term aligns each volume with: its report (the paper), the whole enriched report, "
                   "one enriched statement drawn at every step (the form zero-shot prompts take), either (mixed), or "
                   "all of its statements at once against every statement of the batch (statements).")
@click.option("--losses", default="global,local,global-semantic,local-semantic", show_default=True,
              help="Loss terms to use (the paper's Table 4 ablation).")
@click.option("--mask-pool-layer", type=int, help="First block of the local pathway (default: the config's, -1).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch [default: 32 ViT, 20 UniMiSS].")
@click.option("--epochs", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many steps.")
@click.option("--lr", default=5e-5, show_default=True, type=float)
@click.option("--weight-decay", default=1e-5, show_default=True, type=float)
@click.option("--warmup-steps", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--rsmb-size", default=65536, show_default=True, type=click.IntRange(min=1))
@click.option("--rsmb-init", type=click.Choice(["none", "index"]), default="none", show_default=True,
              help="Warm-start the bank from index/texts.duckdb: the enriched texts embedded by this run's starting "
                   "text tower (use with --init-from and 'mv3d index-texts --encoder <that model>').")
@click.option("--init-from", type=click.Path(file_okay=False),
              help="Start from a saved model (pretrain/<run>/model): its config, weights and text tower.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16 autocast on GPU (CPU always runs fp32).")
@click.option("--grad-checkpointing", is_flag=True, help="Activation checkpointing (less memory, ~30% slower).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0), help="Data loader workers.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes on this node: launches torchrun --standalone (use torchrun yourself for multi-node).")
@click.option("--checkpoint-every", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--resume", is_flag=True, help="Continue the run from its latest checkpoint.")
@click.option("--run", "run_name", help="Run name (folder under pretrain/) [default: <backbone>-<time>].")
@click.option("--seed", default=0, show_default=True, type=int)
@pass_stage_context
def command(sctx: StageContext, backbone, model_config, text_encoder, freeze_text, global_text, init_from, losses,
            mask_pool_layer, batch_size, epochs, max_steps, lr, weight_decay, warmup_steps, rsmb_size, rsmb_init,
            precision, grad_checkpointing, compile_, workers, nproc, checkpoint_every, resume, run_name, seed):
    """Pretrain MedVista3D (global + local + semantic alignment) on prep's volumes and masks, the
    report and region sentences, and rewrite's enriched texts. Defaults are the paper's."""
    from ..train.launch import pretrain

    pretrain(sctx, backbone=backbone, model_config=model_config or DEFAULT_CONFIG[backbone],
             text_encoder=text_encoder, freeze_text=freeze_text, global_text=global_text, init_from=init_from,
             losses=losses, mask_pool_layer=mask_pool_layer,
             batch_size=batch_size or PAPER_BATCH[backbone], epochs=epochs, max_steps=max_steps, lr=lr,
             weight_decay=weight_decay, warmup_steps=warmup_steps, rsmb_size=rsmb_size, rsmb_init=rsmb_init,
             precision=precision, grad_checkpointing=grad_checkpointing, compile_=compile_, workers=workers,
             nproc=nproc, checkpoint_every=checkpoint_every, resume=resume, run_name=run_name, seed=seed)


STAGE = Stage(
    name="pretrain",
    command=command,
    summary="Pretrain MedVista3D (ViT or UniMiSS) with global, local and semantic alignment; torchrun-ready.",
    inputs=("prep.manifest", "prep.volumes", "prep.regions"),
    outputs=(Artifact("pretrain.model", "pretrain", "the final model/ of the latest run (loadable)", optional=True),),
    lock=lambda p: f"pretrain.{p.get('run_name') or 'new'}",
)
