#!/usr/bin/env bash
# DanceGRPO baseline on Qwen-Image-Edit: the Qwen-Image DanceGRPO launcher (12 independent SDE trajectories per
# prompt, 20 steps, eta 0.3, true CFG 4.0) at 512 x 512 with 512 x 512 sources and the edit rewards.
# Environment: scripts/lib/qwen_image_edit.sh (H, W, SOURCE_SIZE, REWARD, DATA_JSON) and scripts/lib/qwen_image.sh
# (NPROC, MODEL_PATH, OUTPUT_DIR, USE_LORA, GUIDANCE, ...). Extra flags go to the trainer and win. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/qwen_image_edit.sh
exec bash scripts/finetune/finetune_qwen_image_dancegrpo_8gpus.sh "${EDIT_ARGS[@]}" "$@"
