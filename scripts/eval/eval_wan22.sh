#!/usr/bin/env bash
# Evaluate Wan2.2 T2V-A14B (two experts; base, or one of our checkpoints: full transformer/ + transformer_2/ or the
# two LoRA files): scripts/eval/eval_wan.sh with --model wan22 and the A14B recipe's defaults - GUIDANCE (4.0, the
# high-noise expert's), GUIDANCE_2 (3.0, the low-noise expert's), SHIFT (12) - and MODEL_PATH data/wan22; every other
# variable as there. Use the training run's sizes, guidance, shift and negative prompt. See docs/wan22.md.
#
#   CHECKPOINT=outputs/wan22_branchgrpo_base/checkpoints/checkpoint-300 bash scripts/eval/eval_wan22.sh
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO_ROOT/scripts/lib/common.sh"
bg_require_number GUIDANCE_2
bg_check_inputs
WAN_BACKBONE=wan22 WAN_CHECKPOINT=Wan2.2-T2V-A14B GUIDANCE="${GUIDANCE:-4.0}" SHIFT="${SHIFT:-12}" \
  exec bash "$REPO_ROOT/scripts/eval/eval_wan.sh" --guidance_scale_2 "${GUIDANCE_2:-3.0}" "$@"
