#!/usr/bin/env bash
# MedVista3D's segmentation transfer (the paper's Table 6) on TotalSegmentator: the pretrained
# MedVista3D-UniMiSS encoder with an STU-Net-B decoder, trained inside nnU-Net v2 with the paper's settings
# (lr 5e-5, batch 2, 128^3 patches, 1,000 epochs of 250 iterations, nnU-Net's 5-fold split, fold FOLD), beside
# the same network from a random start (the baseline the pretraining must beat). One GPU each; then the
# per-class Dice of both in segment/<run>/per_class.csv and the mean DSC in `mv3d summary`.
# Usage: recipes/totalseg.sh PROJECT TOTALSEG_ROOT [MODEL] [FOLD]
#   PROJECT        a project with a pretrained UniMiSS model (recipes/ctrate-paper.sh trains unimiss-small-paper)
#   TOTALSEG_ROOT  TotalSegmentator v2 as downloaded: meta.csv, <case>/ct.nii.gz, <case>/segmentations/*.nii.gz
#   MODEL          the pretrained model folder (default pretrain/unimiss-small-paper/model)
# A CPU try on synthetic data: mv3d synth ts/ --dataset totalseg --n-train 10 --shape 32 64 64 --spacing 3 1.5 1.5,
# then segment-finetune with --patch 32 64 64 --epochs 20 --iterations 10 --lr 1e-3 --device cpu (benchmarks/segment.py).
set -euo pipefail
P=$1
DATA=$2
MODEL=${3:-pretrain/unimiss-small-paper/model}
FOLD=${4:-0}
PAPER=(--patch 128 128 128 --batch-size 2 --lr 5e-5 --epochs 1000 --iterations 250 --intensity mv3d --device cuda)

mv3d -P "$P" segment-finetune --model "$MODEL" --data "$DATA" --layout totalseg --fold "$FOLD" "${PAPER[@]}" \
     --init pretrained --run "totalseg-fold$FOLD"
mv3d -P "$P" segment-finetune --model "$MODEL" --data "$DATA" --layout totalseg --fold "$FOLD" "${PAPER[@]}" \
     --init random --run "totalseg-fold$FOLD-random"
mv3d -P "$P" summary
