#!/usr/bin/env bash
# The main job on the embedded default: align the shipped toy digit model (text -> 8x8 digit, flow matching) with
# its offline reward on a CPU, in about ten minutes on 2 cores. Sets up the environment first if needed.
#
#   bash scripts/finetune/finetune_toy_branchgrpo.sh                     # BranchGRPO, outputs/toy_branchgrpo/
#   ALGO=dancegrpo bash scripts/finetune/finetune_toy_branchgrpo.sh      # or mixgrpo, g2rpo, flow_grpo(_fast)
#   bash scripts/finetune/finetune_toy_branchgrpo.sh --max_train_steps 20 --width_pruning_mode 1
#
# Environment: ALGO (branchgrpo), OUTPUT_DIR (outputs/toy_$ALGO), NPROC (1 process; >1 runs torchrun with gloo),
# CONFIG (configs/toy_$ALGO.yaml), SKIP_SETUP=1 to skip env_setup.sh (booleans: 1/true/yes/on or 0/false/no/off).
# Extra flags go to the trainer ("$@").
# Writes metrics.jsonl, summary.json, reward_curve.png, samples/*.png (before/after grids), checkpoints/.
# Running it again into the same OUTPUT_DIR is refused: add --resume_from_checkpoint latest or --overwrite_output_dir.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TOY_BACKBONE=toy
TOY_TRAIN_ARGS=()  # configs/toy_$ALGO.yaml says model: toy, reward: toy
source scripts/lib/toy.sh
