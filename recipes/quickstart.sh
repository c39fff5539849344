#!/usr/bin/env bash
# Quickstart (`make demo`): the whole MedVista3D chain on synthetic CT-RATE data, on a CPU, in about nine minutes:
# synth -> prep -> rewrite -> index-texts -> pretrain -> zeroshot -> retrieve -> summary.
# Usage: recipes/quickstart.sh [DIR]   (default: demo/; the dataset goes to DIR/ctrate, the project to DIR/project)
# Rerunning it on the same DIR redoes only what changed (a finished pretraining run is resumed, not
# repeated; after changing the pretraining settings, remove DIR/project/pretrain/quickstart first).
set -euo pipefail
DIR=${1:-demo}
P="$DIR/project"
RUN=quickstart

# The tiny CPU settings, all in one place.
# Synthetic scans are drawn directly on the demo grid (6 x 1.5 x 1.5 mm, 32 x 64 x 64 voxels).
SYNTH=(--n-train 960 --n-valid 120 --shape 32 64 64 --spacing 6 1.5 1.5 --seed 0)
PREP=(--spacing 6 1.5 1.5 --size 32 64 64 --workers 2)
PRETRAIN=(--backbone vit --model-config vit-tiny --freeze-text --global-text statements --batch-size 16 --epochs 8 --warmup-steps 20 \
          --lr 1e-3 --workers 1)
MODEL="pretrain/$RUN/model"
RESUME=()
[ -d "$P/pretrain/$RUN/checkpoints" ] && RESUME=(--resume)

SECONDS=0
mv3d synth "$DIR/ctrate" "${SYNTH[@]}"
mv3d init "$P"
mv3d -P "$P" prep "$DIR/ctrate" "${PREP[@]}"
mv3d -P "$P" rewrite --backend rules
mv3d -P "$P" index-texts
mv3d -P "$P" index-texts search "small pleural effusion" -k 3
mv3d -P "$P" pretrain "${PRETRAIN[@]}" --run "$RUN" "${RESUME[@]}"
mv3d -P "$P" zeroshot --model "$MODEL" --mode global,local --run "$RUN"
mv3d -P "$P" retrieve --model "$MODEL" --run "$RUN"
mv3d -P "$P" summary
echo "quickstart finished in ${SECONDS}s"
