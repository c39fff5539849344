#!/usr/bin/env bash
# Quickstart (`make demo`): the whole MedVista3D chain on synthetic CT-RATE data, on a CPU, in about nine minutes:
# synth -> prep -> rewrite -> index-texts -> pretrain -> zeroshot -> retrieve -> summary.
# Usage: recipes/quickstart.sh [DIR]   (default: demo/; the dataset goes to DIR/ctrate, the project to DIR/project)
# Rerunning it on the same DIR redoes only what changed (a finished pretraining run is resumed, not
# repeated; after changing the pretraining settings, remove DIR/project/pretrain/quickstart first).
# Smaller runs (the test suite runs one end to end) set these; unset, they are the demo's sizes:
#   MV3D_DEMO_N_TRAIN (960 scans), MV3D_DEMO_N_VALID (120 scans), MV3D_DEMO_EPOCHS (8),
#   MV3D_DEMO_BATCH_SIZE (16), MV3D_DEMO_WARMUP_STEPS (20), MV3D_DEMO_WORKERS (pretraining loader processes, 1)
#   e.g. MV3D_DEMO_N_TRAIN=24 MV3D_DEMO_N_VALID=12 MV3D_DEMO_EPOCHS=1 recipes/quickstart.sh /tmp/mini
set -euo pipefail
DIR=${1:-demo}
P="$DIR/project"
RUN=quickstart
N_TRAIN=${MV3D_DEMO_N_TRAIN:-960}
N_VALID=${MV3D_DEMO_N_VALID:-120}
EPOCHS=${MV3D_DEMO_EPOCHS:-8}
BATCH_SIZE=${MV3D_DEMO_BATCH_SIZE:-16}
WARMUP_STEPS=${MV3D_DEMO_WARMUP_STEPS:-20}
WORKERS=${MV3D_DEMO_WORKERS:-1}

# The tiny CPU settings, all in one place.
# Synthetic scans are drawn directly on the demo grid (6 x 1.5 x 1.5 mm, 32 x 64 x 64 voxels).
SYNTH=(--n-train "$N_TRAIN" --n-valid "$N_VALID" --shape 32 64 64 --spacing 6 1.5 1.5 --seed 0)
PREP=(--spacing 6 1.5 1.5 --size 32 64 64 --workers 2)
PRETRAIN=(--backbone vit --model-config vit-tiny --freeze-text --global-text statements --batch-size "$BATCH_SIZE" \
          --epochs "$EPOCHS" --warmup-steps "$WARMUP_STEPS" --lr 1e-3 --workers "$WORKERS")
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
