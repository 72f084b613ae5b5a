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
source scripts/lib/common.sh

ALGO="${ALGO:-branchgrpo}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/toy_${ALGO}}"
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

# 1. the toy's prompts -> embeddings, through the same preprocess step and format as FLUX (skipped when done)
TRAIN_PROMPTS="$("$PY" -c 'from branchgrpo.toy.data import train_prompts_path as p; print(p())')"
EVAL_PROMPTS="$("$PY" -c 'from branchgrpo.toy.data import eval_prompts_path as p; print(p())')"
"$PY" -m branchgrpo.cli.preprocess --model toy --device cpu --prompts "$TRAIN_PROMPTS" \
  --output_dir "$OUTPUT_DIR/embeddings/train" --shard_size 256
"$PY" -m branchgrpo.cli.preprocess --model toy --device cpu --prompts "$EVAL_PROMPTS" \
  --output_dir "$OUTPUT_DIR/embeddings/eval" --shard_size 256

# 2. GRPO
bg_launch branchgrpo.cli.train --config "$CONFIG" --device cpu \
  --data_json_path "$OUTPUT_DIR/embeddings/train/index.json" \
  --eval_data_json_path "$OUTPUT_DIR/embeddings/eval/index.json" \
  --output_dir "$OUTPUT_DIR" "$@"
