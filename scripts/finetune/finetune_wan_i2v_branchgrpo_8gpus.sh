#!/usr/bin/env bash
# BranchGRPO on Wan2.1 image-to-video (Wan2.1-I2V-14B-480P; 720P: H=720 W=1280 SHIFT=5), one node of 8 GPUs
# (torchrun, FSDP2 per Wan block, activation checkpointing, bf16). The T2V launcher's settings (the paper's tree:
# 20 steps, splits 0,3,6,9 = 16 videos per prompt, eta 0.3; CFG 5.0 in rollout and training, the image condition on
# both rows; lr 1e-5, clip range 1e-3) with VideoAlign motion quality as the reward, DanceGRPO's choice for
# image-to-video (the look of the video is set by its first frame). Add first_frame_consistency to keep the video
# faithful to its image, e.g. REWARD="videoalign=1.0,first_frame_consistency=0.5". VARIANT=base|widpru|deppru|mix.
# Prompts: scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh, with the same H, W and FRAMES as here.
# Environment and defaults: scripts/lib/wan.sh (MODEL_PATH data/wan_i2v, DATA_JSON data/wan_i2v_embeddings/index.json,
# OUTPUT_DIR outputs/wan_i2v_branchgrpo_<variant>). Extra flags go to the trainer. See docs/wan.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree
WAN_BACKBONE=wan_i2v
WAN_CHECKPOINT="Wan2.1-I2V-14B-480P (or -720P)"
source scripts/lib/wan.sh
