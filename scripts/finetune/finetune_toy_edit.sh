#!/usr/bin/env bash
# The edit toy on a CPU: align the shipped edit toy (instruction + source digit -> edited digit, flow matching,
# branchgrpo/toy/edit_assets/) with its offline edit reward ("toy_edit": edit done x class, style and pixels kept).
# The toy's configs (configs/toy_$ALGO.yaml) with the edit backbone, reward and prompts (docs/editing.md).
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
source scripts/lib/common.sh

ALGO="${ALGO:-branchgrpo}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/toy_edit_${ALGO}}"
bg_bool SKIP_SETUP 0
if [[ -n "${CONFIG:-}" ]]; then
  bg_require_file "$CONFIG" "CONFIG: the YAML file of flag values it names"
else
  CONFIG="configs/toy_${ALGO}.yaml"
  bg_require_file "$CONFIG" "ALGO: no toy config for ALGO=$ALGO (configs/toy_*.yaml lists those there are)"
fi
bg_check_inputs
[[ "$SKIP_SETUP" == 1 ]] || bash env_setup.sh
bg_python

# 1. the built-in edits (JSONL: instruction + source PNG) -> embeddings + source images (skipped when done)
TRAIN_EDITS="$("$PY" -c 'from branchgrpo.toy.edit import train_edits_path as p; print(p())')"
EVAL_EDITS="$("$PY" -c 'from branchgrpo.toy.edit import eval_edits_path as p; print(p())')"
"$PY" -m branchgrpo.cli.preprocess --model toy_edit --device cpu --prompts "$TRAIN_EDITS" \
  --output_dir "$OUTPUT_DIR/embeddings/train" --shard_size 256
"$PY" -m branchgrpo.cli.preprocess --model toy_edit --device cpu --prompts "$EVAL_EDITS" \
  --output_dir "$OUTPUT_DIR/embeddings/eval" --shard_size 256

# 2. GRPO: the toy's settings, the edit backbone and reward, every held-out edit evaluated
bg_launch branchgrpo.cli.train --config "$CONFIG" --device cpu --model toy_edit --reward toy_edit \
  --num_eval_prompts 40 \
  --data_json_path "$OUTPUT_DIR/embeddings/train/index.json" \
  --eval_data_json_path "$OUTPUT_DIR/embeddings/eval/index.json" \
  --output_dir "$OUTPUT_DIR" "$@"
