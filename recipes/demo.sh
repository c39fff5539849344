#!/usr/bin/env bash
# The CPU demo: synthetic CT-RATE data through every stage that exists so far.
# Usage: recipes/demo.sh [DIR]   (default: demo/)
set -euo pipefail
DIR=${1:-demo}
P="$DIR/project"

mv3d synth "$DIR/ctrate" --n-train 8 --n-valid 4 --seed 0
mv3d init "$P"
mv3d -P "$P" stats "$DIR/ctrate"
mv3d -P "$P" prep "$DIR/ctrate" --spacing 3 1.5 1.5 --size 64 64 64 --workers 2
mv3d -P "$P" rewrite --backend rules
mv3d -P "$P" pretrain --backbone vit --model-config vit-tiny --batch-size 4 --max-steps 8 --warmup-steps 2 \
     --lr 1e-4 --workers 2
mv3d -P "$P" status
