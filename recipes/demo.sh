#!/usr/bin/env bash
# The CPU demo: synthetic CT-RATE data through every stage that exists so far.
# Usage: recipes/demo.sh [DIR]   (default: demo/)
set -euo pipefail
DIR=${1:-demo}

mv3d synth "$DIR/ctrate" --n-train 8 --n-valid 4 --seed 0
mv3d init "$DIR/project"
mv3d -P "$DIR/project" stats "$DIR/ctrate"
mv3d -P "$DIR/project" status
