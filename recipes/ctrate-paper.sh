#!/usr/bin/env bash
# MedVista3D on CT-RATE + RadGenome-ChestCT, the paper's setting, on one 8-GPU node: pretraining of both
# backbones, then the paper's evaluations on the internal validation split.
# Usage: recipes/ctrate-paper.sh /data/CT-RATE /data/RadGenome-ChestCT [PROJECT]
# Needs: a local Ollama serving the rewrite model (ollama pull llama3.1:8b && ollama serve).
set -euo pipefail
CTRATE=$1
RADGENOME=$2
P=${3:-ctrate-paper}

mv3d init "$P"
# RadGenome's masks live on its *_preprocessed grid: ingest those volumes with their masks.
mv3d -P "$P" prep "$RADGENOME" --layout radgenome --workers 16 --spacing 3 1 1 --size 96 320 320
mv3d -P "$P" rewrite --backend ollama --model llama3.1:8b --concurrency 16
mv3d -P "$P" pretrain --backbone vit --nproc 8 --run vit-b-paper
mv3d -P "$P" pretrain --backbone unimiss --nproc 8 --run unimiss-small-paper

# Evaluation (DESIGN §1 targets): zero-shot over the 18 labels, global, organ-level (fVLM's mapping) and
# the global-only organ crops, with CT-CLIP's 1000 bootstrap resamples; report -> volume recall@k,
# volume -> volume MAP@k and region grounding. index-texts stores each model's text embeddings once
# (mv3d index-texts search then searches in that model's space; retrieve reuses the report embeddings).
mv3d -P "$P" index-texts --encoder pretrain/unimiss-small-paper/model --device cuda
mv3d -P "$P" zeroshot --model pretrain/unimiss-small-paper/model --mode global,local,global-crop --bootstrap 1000 \
     --batch-size 16 --workers 8 --run unimiss-small-paper
mv3d -P "$P" retrieve --model pretrain/unimiss-small-paper/model --batch-size 16 --workers 8 --run unimiss-small-paper
mv3d -P "$P" summary
mv3d -P "$P" index-texts --encoder pretrain/vit-b-paper/model --device cuda
mv3d -P "$P" zeroshot --model pretrain/vit-b-paper/model --mode global,local,global-crop --bootstrap 1000 \
     --batch-size 16 --workers 8 --run vit-b-paper
mv3d -P "$P" retrieve --model pretrain/vit-b-paper/model --batch-size 16 --workers 8 --run vit-b-paper
mv3d -P "$P" summary
mv3d -P "$P" status
echo "CT-RATE original volumes (without RadGenome masks) can be added with: mv3d -P $P prep $CTRATE"
