#!/usr/bin/env bash
# The edit toy on a CPU: align the shipped edit toy (instruction + source digit -> edited digit, flow matching,
# branchgrpo/toy/edit_assets/) with its offline edit reward ("toy_edit": edit done x class, style and pixels kept).
# The toy's configs (configs/toy_$ALGO.yaml) with the edit backbone, reward and prompts, and the edit toy's own
# optimisation settings: 32 edits per iteration, learning rate 5e-5, no KL, 40 iterations (docs/editing.md section 9:
# with the toy's 8 prompts and 3e-4 the held-out edit reward rises, then falls below the base).
#
#   bash scripts/finetune/finetune_toy_edit.sh                           # BranchGRPO, outputs/toy_edit_branchgrpo/
#   ALGO=dancegrpo bash scripts/finetune/finetune_toy_edit.sh            # or mixgrpo, g2rpo, flow_grpo(_fast)
#   bash scripts/finetune/finetune_toy_edit.sh --max_train_steps 30
#
# Environment: ALGO (branchgrpo), OUTPUT_DIR (outputs/toy_edit_$ALGO), NPROC (1 process; >1 runs torchrun with
# gloo), CONFIG (configs/toy_$ALGO.yaml), SKIP_SETUP=1 to skip env_setup.sh (booleans: 1/true/yes/on or
# 0/false/no/off). Extra flags go to the trainer ("$@").
# Writes metrics.jsonl, summary.json, reward_curve.png, samples/*.png (before/after grids), checkpoints/.
# Running it again into the same OUTPUT_DIR is refused: add --resume_from_checkpoint latest or --overwrite_output_dir.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TOY_BACKBONE=toy_edit
# the toy's settings with the edit backbone and reward, every held-out edit evaluated, the comparison's optimisation
# settings (ToyEditSpec.comparison_flags)
TOY_TRAIN_ARGS=(--model toy_edit --reward toy_edit --num_eval_prompts 40 --train_batch_size 32 --learning_rate 5e-5
                --kl_coef 0 --max_train_steps 40 --validation_steps 5 --checkpointing_steps 10)
source scripts/lib/toy.sh
