#!/usr/bin/env bash
# Evaluate Wan2.2 TI2V-5B (base, or one of our checkpoints: full transformer/ or the LoRA file):
# scripts/eval/eval_wan.sh with --model wan22_ti2v (IMAGE_TO_VIDEO=1: wan22_ti2v_i2v, JSONL prompts with a first
# frame, default assets/i2v_prompts.jsonl) and the release's defaults - H 704, W 1280, GUIDANCE 5.0, SHIFT 5 - and
# MODEL_PATH data/wan22_ti2v; every other variable as there. Use the training run's sizes, guidance, shift and
# negative prompt. See docs/wan22.md.
#
#   CHECKPOINT=outputs/wan22_ti2v_branchgrpo_base/checkpoints/checkpoint-300 bash scripts/eval/eval_wan22_ti2v.sh
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO_ROOT/scripts/lib/common.sh"
bg_bool IMAGE_TO_VIDEO 0
BACKBONE=wan22_ti2v
DEFAULT_PROMPTS=assets/video_prompts.txt
[[ "$IMAGE_TO_VIDEO" == 1 ]] && { BACKBONE=wan22_ti2v_i2v; DEFAULT_PROMPTS=assets/i2v_prompts.jsonl; }
PROMPTS="${PROMPTS:-$DEFAULT_PROMPTS}"
WAN_BACKBONE="$BACKBONE" WAN_CHECKPOINT=Wan2.2-TI2V-5B WAN_DOC=docs/wan22.md MODEL_PATH="${MODEL_PATH:-data/wan22_ti2v}" PROMPTS="$PROMPTS" \
  H="${H:-704}" W="${W:-1280}" GUIDANCE="${GUIDANCE:-5.0}" SHIFT="${SHIFT:-5}" \
  exec bash "$REPO_ROOT/scripts/eval/eval_wan.sh" "$@"
