"""``mv3d pretrain``'s options, written once (:mod:`mv3dtk.options`), with the paper's defaults.

The field defaults are the paper's settings (MedVista3D §4: AdamW, lr 5e-5, weight decay 1e-5, 200
warm-up steps, a 65,536-entry RSMB, batch 32 for ViT-B and 20 for UniMiSS). This module is imported
when the CLI builds ``mv3d pretrain --help``, so it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError
from ..options import LaunchOptions, option

LOSS_TERMS = ("global", "local", "global_semantic", "local_semantic")  # eq. 16; the names in metrics.jsonl
GLOBAL_TEXTS = ("report", "enriched", "statement", "mixed", "statements")
PAPER_CONFIG = {"vit": "vit-b", "unimiss": "unimiss-small"}
PAPER_BATCH = {"vit": 32, "unimiss": 20}


def parse_losses(spec: str) -> tuple[str, ...]:
    """``"global,local,global-semantic"`` -> the loss terms (``-`` and ``_`` both accepted)."""
    terms = tuple(t.strip().replace("-", "_") for t in spec.split(",") if t.strip())
    bad = [t for t in terms if t not in LOSS_TERMS]
    if bad or not terms:
        raise ConfigError(f"--losses {spec!r}: choose from {', '.join(LOSS_TERMS)}")
    return terms


@dataclass(kw_only=True)
class PretrainOptions(LaunchOptions):
    backbone: str = option("vit", "Image backbone.", choices=("vit", "unimiss"))
    model_config: str | None = option(None, "Config name (vit-b, unimiss-small, vit-tiny, unimiss-tiny) or JSON path "
                                            "[default: the backbone's paper config].")
    text_encoder: str = option("default", "'default' (the config's), 'minilm', a local model directory or a cached HF "
                                          "repo id.")
    freeze_text: bool = option(False, "Keep the text tower as loaded and train only its projection (its features are "
                                      "computed once per distinct text: several times faster on CPU and for small "
                                      "datasets).", is_flag=True)
    global_text: str = option("report", "What the global term aligns each volume with: its report (the paper), the "
                                        "whole enriched report, one enriched statement drawn at every step (the form "
                                        "zero-shot prompts take), either (mixed), or all of its statements at once "
                                        "against every statement of the batch (statements).", choices=GLOBAL_TEXTS)
    losses: str = option(",".join(LOSS_TERMS), "Loss terms to use (the paper's Table 4 ablation; '-' may stand for "
                                               "'_').")
    mask_pool_layer: int | None = option(None, "First block of the local pathway (default: the config's, -1).")
    batch_size: int | None = option(None, "Global batch [default: 32 ViT, 20 UniMiSS].", min=1)
    epochs: int = option(16, "Passes over the training split.", min=1)
    max_steps: int | None = option(None, "Stop after this many steps.", min=1)
    lr: float = option(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = option(1e-5, "AdamW weight decay.")
    warmup_steps: int = option(200, "Linear warm-up steps before the cosine decay.", min=0)
    rsmb_size: int = option(65536, "Entries of the Radiology Semantic Matching Bank.", min=1)
    rsmb_init: str = option("none", "Warm-start the bank from index/texts.duckdb: the enriched texts embedded by this "
                                    "run's starting text tower (use with --init-from and 'mv3d index-texts --encoder "
                                    "<that model>').", choices=("none", "index"))
    init_from: str | None = option(None, "Start from a saved model (pretrain/<run>/model): its config, weights and text "
                                         "tower.", path="dir")
    precision: str = option("bf16", "bf16 autocast on GPU (CPU always runs fp32).", choices=("bf16", "fp32"))
    grad_checkpointing: bool = option(False, "Activation checkpointing (less memory, ~30% slower).", is_flag=True)
    compile: bool = option(False, "torch.compile the model.", is_flag=True)
    workers: int = option(4, "Data loader workers.", min=0)
    checkpoint_every: int = option(500, "Steps between checkpoints.", min=1)
    seed: int = option(0, "Seed of the initialisation, the data order and the statement draws.")

    def with_paper_defaults(self) -> "PretrainOptions":
        """The backbone's paper config and batch where none was given."""
        return replace(self, model_config=self.model_config or PAPER_CONFIG[self.backbone],
                       batch_size=self.batch_size or PAPER_BATCH[self.backbone])
