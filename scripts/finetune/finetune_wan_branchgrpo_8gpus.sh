#!/usr/bin/env bash
# BranchGRPO on Wan2.1-T2V-1.3B (text-to-video), one node of 8 GPUs (torchrun, FSDP2 per Wan block, activation
# checkpointing, bf16): 20 steps, splits 0,3,6,9 (16 videos per prompt), eta 0.3, CFG 5.0 in rollout and training,
# VideoAlign motion quality as the reward. VARIANT=base|widpru|deppru|mix as for FLUX.
# Environment and defaults: scripts/lib/wan.sh. Extra flags go to the trainer (e.g. --reward frame_reward=1.0).
# Rollout videos are written as MP4 under $OUTPUT_DIR/samples/ every 10 iterations.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree
source scripts/lib/wan.sh
