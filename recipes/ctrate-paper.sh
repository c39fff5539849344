#!/usr/bin/env bash
# MedVista3D on CT-RATE + RadGenome-ChestCT, the paper's setting, on one 8-GPU node.
# Usage: recipes/ctrate-paper.sh /data/CT-RATE /data/RadGenome-ChestCT [PROJECT]
# Needs: a local Ollama serving the rewrite model (ollama pull llama3.1:8b && ollama serve).
# Evaluation (zeroshot / retrieve) and index-texts join this recipe as those stages land.
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
mv3d -P "$P" status
echo "CT-RATE original volumes (without RadGenome masks) can be added with: mv3d -P $P prep $CTRATE"
