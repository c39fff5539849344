"""``mv3d vqa-train``'s options, written once (:mod:`mv3dtk.options`), with the paper's defaults.

The defaults are CT-CHAT's scripts, which the MedVista3D paper follows (LoRA r 128, alpha 256, lr 2e-5,
10 epochs): stage 1 trains the projector alone at lr 1e-3 for one epoch; stage 2 trains LoRA on every
linear layer of the LLM plus the projector (its own lr 2e-5), global batch 36 (3 per device x 12
accumulation), 3 % warm-up then cosine, sequences up to 4,096 tokens. Imported by ``--help``: nothing
heavy here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import LaunchOptions, option

STAGES = ("1", "2", "both")


@dataclass(kw_only=True)
class VqaTrainOptions(LaunchOptions):
    model: str | None = option(None, "Pretrained model whose frozen image tower feeds the LLM, e.g. "
                                     "pretrain/<run>/model [default: the project's latest].", path="dir")
    llm: str | None = option(None, "Local Llama-architecture folder (config.json, safetensors weights, tokenizer, chat "
                                   "template), e.g. Llama-3.1-8B-Instruct; loaded offline.", path="dir")
    vqa: tuple[str, ...] = option((), "CT-CHAT VQA JSON: a CT-RATE root (dataset/vqa/*_vqa.json) or a FILE.json; "
                                      "repeatable. Items are trained on when their volume is in prep's train split. "
                                      "Needed by stage 2.", multiple=True)
    stage: str = option("both", "1: the projector alone on volume-report pairs (LLaVA's 'plain' captioning); 2: LoRA "
                                "+ projector on the VQA conversations; both: 1 then 2.", choices=STAGES)
    token_pool: tuple[int, int, int] | None = option(None, "Average-pool the encoder's token grid to D H W tokens "
                                                           "(e.g. 3 10 10 = 300) [default: keep every final token, as "
                                                           "LLaVA-1.5 does].", nargs=3)
    lora_r: int = option(128, "LoRA rank.", min=1)
    lora_alpha: float = option(256.0, "LoRA alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lr1: float = option(1e-3, "Stage 1 peak learning rate (projector).")
    epochs1: int = option(1, "Stage 1 epochs.", min=1)
    lr2: float = option(2e-5, "Stage 2 peak learning rate (LoRA).")
    projector_lr: float = option(2e-5, "Stage 2 learning rate of the projector.")
    epochs2: int = option(10, "Stage 2 epochs.", min=1)
    batch_size: int = option(36, "Global batch (samples per optimizer step, all processes).", min=1)
    micro_batch: int = option(3, "Samples per forward on each process (gradient accumulation fills the batch).", min=1)
    max_length: int = option(4096, "Longest sequence in LLM positions (image tokens included); longer ones are cut.",
                             min=8)
    precision: str = option("bf16", "bf16 weights and autocast on GPU (CPU always runs fp32).", choices=("bf16", "fp32"))
    grad_checkpointing: bool = option(False, "Activation checkpointing in the LLM (less memory, slower).", is_flag=True)
    max_steps: int | None = option(None, "Stop each stage after this many steps.", min=1)
    checkpoint_every: int = option(200, "Steps between checkpoints.", min=1)
    encode_batch: int = option(2, "Volumes per forward when the frozen encoder fills the token cache.", min=1)
    seed: int = option(0, "Seed of the projector's initialisation, LoRA's and the data order.")
