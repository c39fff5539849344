#!/usr/bin/env bash
# The paper's Table 4: which loss terms matter. One pretraining run per row, same data and seed.
# Usage: recipes/ablation.sh PROJECT [NPROC]     (PROJECT must have run prep and rewrite)
set -euo pipefail
P=$1
N=${2:-8}

mv3d -P "$P" pretrain --nproc "$N" --run ablation-global        --losses global
mv3d -P "$P" pretrain --nproc "$N" --run ablation-global-local  --losses global,local
mv3d -P "$P" pretrain --nproc "$N" --run ablation-no-semantic   --losses global,local
mv3d -P "$P" pretrain --nproc "$N" --run ablation-global-sem    --losses global,global_semantic
mv3d -P "$P" pretrain --nproc "$N" --run ablation-full          --losses global,local,global_semantic,local_semantic
mv3d -P "$P" status
