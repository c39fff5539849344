#!/usr/bin/env bash
# MedVista3D-LLaVA on CT-RATE's VQA data, the paper's settings (which are CT-CHAT's): the frozen
# MedVista3D-ViT encoder of a pretrained project feeds a 2-layer MLP-GELU projector into
# Llama-3.1-8B-Instruct; stage 1 tunes the projector on volume-report pairs (lr 1e-3, 1 epoch), stage 2
# LoRA-tunes the LLM (r 128, alpha 256, dropout 0.05, lr 2e-5, projector lr 2e-5, 10 epochs), bf16 with
# gradient checkpointing. The global batch is CT-CHAT's 36 (3 per forward, accumulated): NPROC (default 4)
# GPUs must divide it (1, 2, 3, 4, 6, 9, 12...). Then the four CT-CHAT tasks are scored on the valid split.
# Usage: recipes/vqa.sh PROJECT CT-RATE_ROOT LLAMA_DIR [RUN]
#   PROJECT      a project with prep and a pretrained ViT (recipes/ctrate-paper.sh makes one)
#   CT-RATE_ROOT holds dataset/vqa/{train,valid}_vqa.json (CT-CHAT's VQA JSON from the CT-RATE dataset)
#   LLAMA_DIR    a local Llama-3.1-8B-Instruct folder (config.json, *.safetensors, tokenizer.json, chat template)
set -euo pipefail
P=$1
CTRATE=$2
LLAMA=$3
RUN=${4:-llava-vit-b-paper}
NPROC=${NPROC:-4}

mv3d -P "$P" vqa-train --model pretrain/vit-b-paper/model --llm "$LLAMA" --vqa "$CTRATE" --stage both \
     --lora-r 128 --lora-alpha 256 --lora-dropout 0.05 --lr1 1e-3 --epochs1 1 --lr2 2e-5 --projector-lr 2e-5 \
     --epochs2 10 --batch-size 36 --micro-batch 3 --max-length 4096 --precision bf16 --grad-checkpointing \
     --nproc "$NPROC" --run "$RUN"
mv3d -P "$P" vqa-eval --run "$RUN" --split valid --tasks long,short,mc,report --max-new-tokens 512 --device cuda
mv3d -P "$P" summary
