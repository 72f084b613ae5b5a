#!/usr/bin/env bash
# BranchGRPO on Wan2.2 TI2V-5B, one node of 8 GPUs (torchrun, FSDP2 per Wan block, activation checkpointing, bf16,
# a full fine-tune: 63 GiB per GPU at the defaults, docs/wan22.md): the Wan2.1 launcher's tree (20 steps, splits
# 0,3,6,9 = 16 videos per prompt, eta 0.3) at the release's 704 x 1280, shift 5 and guidance 5.0, 33 frames,
# VideoAlign motion quality as the reward. IMAGE_TO_VIDEO=1 trains image-to-video from the same checkpoint (JSONL
# prompts with a first frame; add first_frame_consistency to REWARD to keep the video faithful to its image).
# VARIANT=base|widpru|deppru|mix as for FLUX. Environment and defaults: scripts/lib/wan22_ti2v.sh and
# scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree
source scripts/lib/wan22_ti2v.sh
