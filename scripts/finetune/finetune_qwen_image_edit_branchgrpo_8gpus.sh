#!/usr/bin/env bash
# BranchGRPO on Qwen-Image-Edit (instruction-based image editing, 20.4B), one node of 8 GPUs (torchrun, FSDP2 per
# block, activation checkpointing, bf16, LoRA rank 64 by default): the Qwen-Image BranchGRPO launcher (20 steps on the
# dynamic schedule, splits 0,3,6,9, K = 2, eta 0.3; VARIANT=base|widpru|deppru|mix) at 512 x 512 with 512 x 512
# sources, true CFG 4.0 with the negative prompt encoded with each source, and the edit rewards clip_directional +
# source_consistency. The source image enters every node of the tree and every training forward.
# Environment: scripts/lib/qwen_image_edit.sh (H, W, SOURCE_SIZE, REWARD, DATA_JSON) and scripts/lib/qwen_image.sh
# (NPROC, MODEL_PATH, OUTPUT_DIR, USE_LORA, GUIDANCE, ...). Extra flags go to the trainer and win. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/qwen_image_edit.sh
exec bash scripts/finetune/finetune_qwen_image_branchgrpo_8gpus.sh "${EDIT_ARGS[@]}" "$@"
