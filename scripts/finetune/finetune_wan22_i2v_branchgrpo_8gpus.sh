#!/usr/bin/env bash
# BranchGRPO on Wan2.2 I2V-A14B (two experts, boundary 0.9, first-frame channel conditioning, no CLIP tokens), one
# node of 8 GPUs: the Wan2.2 T2V launcher's tree and settings (scripts/finetune/finetune_wan22_branchgrpo_8gpus.sh)
# at the I2V-A14B recipe's shift 5 and guidance 3.5 for both experts; VideoAlign motion quality as the reward (add
# first_frame_consistency to keep the video faithful to its image). Prompts:
# scripts/preprocess/preprocess_wan22_i2v_rl_embeddings.sh with the same H, W and FRAMES. Environment and defaults:
# scripts/lib/wan22.sh and scripts/lib/wan.sh (MODEL_PATH data/wan22_i2v). See docs/wan22.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree
WAN_BACKBONE=wan22_i2v  # scripts/lib/wan22.sh then takes the I2V-A14B recipe's defaults
source scripts/lib/wan22.sh
