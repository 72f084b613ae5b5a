#!/usr/bin/env bash
# BranchGRPO on Qwen-Image (text-to-image, 20.4B), one node of 8 GPUs (torchrun, FSDP2 per block, activation
# checkpointing, bf16, LoRA rank 64 by default): 20 steps on the checkpoint's dynamic schedule, splits 0,3,6,9 (16
# images per prompt), K = 2, eta 0.3, true CFG 4.0 in rollout and training, 512 x 512, HPS-v2.1.
# VARIANT=base|widpru|deppru|mix as for FLUX (docs/flux.md). Environment and defaults: scripts/lib/qwen_image.sh.
# Extra flags go to the trainer and override these.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree --clip_range 1e-3 --tree_split_noise_scale 1.0
source scripts/lib/qwen_image.sh
