#!/usr/bin/env bash
# MixGRPO baseline on Qwen-Image-Edit (EDIT_MODEL=qwen_image_edit_plus for Edit-2509): the Qwen-Image MixGRPO launcher
# (a sliding SDE window of 5 steps in an ODE trajectory, true CFG 4.0) at 512 x 512 with 512 x 512 sources and the
# edit rewards. Environment: scripts/lib/qwen_image_edit.sh and scripts/lib/qwen_image.sh. Extra flags go to the
# trainer and win. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/qwen_image_edit.sh
exec bash scripts/finetune/finetune_qwen_image_mixgrpo_8gpus.sh "${EDIT_ARGS[@]}" "$@"
