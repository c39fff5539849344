"""``mv3d zeroshot``: zero-shot abnormality detection with CT-CLIP's protocol (global), fVLM's organ
mapping (local, with the masks) and the paper's global-only organ crops (global-crop)."""

from __future__ import annotations

import click

from ..runs import StageContext, pass_stage_context
from ._options import eval_options, eval_run, eval_stage, publish


@click.command("zeroshot")
@eval_options(
    "zeroshot",
    click.option("--mode", default="global,local", show_default=True,
                 help="Comma list: global (CT-CLIP), local (organ embedding + masks, fVLM's 16 labels), "
                      "global-crop (organ crop encoded globally, the paper's comparison)."),
    click.option("--prompts", default="ctclip", show_default=True,
                 help="ctclip ('X is present.' / 'X is not present.') or a CSV/JSON file of label,positive,negative."),
    click.option("--templates", help="The two CT-CLIP templates as 'POSITIVE|NEGATIVE', each with one {} for the "
                                     "label [default: '{} is present.|{} is not present.']."),
    click.option("--local-prompts", default="same", show_default=True,
                 help="Prompts of the organ modes: same (as --prompts, the form of the enriched texts the model "
                      "was aligned with), fvlm (fVLM's 'Nodule.' / 'Not Nodule.') or a file."),
    click.option("--labels", help="Comma list of abnormalities [default: all 18; organ modes keep those with an "
                                  "organ]."),
    click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(min=0),
                 help="Bootstrap resamples of the volumes for confidence intervals (0: none; CT-CLIP: 1000)."),
    seed_help="Seed of the bootstrap.",
    before_run=[click.option("--plot/--no-plot", default=True, show_default=True, help="Write roc.png.")],
)
@pass_stage_context
def command(sctx: StageContext, model_dir, split, mode, prompts, templates, local_prompts, labels, bootstrap, seed,
            batch_size, workers, device, precision, plot, run_name, json_):
    """Zero-shot detection of the 18 CT-RATE abnormalities: per-class AUROC, F1, precision and
    accuracy at CT-CLIP's threshold, macro means; writes zeroshot/<run>/."""
    from ..eval.zeroshot import format_table, run_zeroshot

    root, model_path, run_dir = eval_run(sctx, "zeroshot", model_dir, run_name, split)
    summary = run_zeroshot(root, model_path, run_dir, split=split, modes=mode, prompts=prompts, templates=templates,
                           local_prompts=local_prompts, labels=labels, bootstrap=bootstrap, seed=seed,
                           batch_size=batch_size, workers=workers, device=device, precision=precision, plot=plot,
                           log=sctx.log)
    publish(sctx, "zeroshot.run", run_dir, summary, format_table(summary), json_)


STAGE = eval_stage("zeroshot", command,
                   "Zero-shot abnormality detection (global, organ-level, organ crops) with CT-CLIP's metrics.",
                   "metrics.json, per_class.csv, probabilities.parquet, roc.png")
