#!/usr/bin/env bash
# BranchGRPO on Wan2.2 T2V-A14B (two experts), one node of 8 GPUs (torchrun, FSDP2 per Wan block of both experts,
# activation checkpointing, bf16, LoRA rank 64 by default): the Wan2.1 launcher's tree (20 steps, splits 0,3,6,9 = 16
# videos per prompt, eta 0.3) at the A14B recipe's shift 12 and guidance 4.0 (high-noise expert) / 3.0 (low-noise),
# VideoAlign motion quality as the reward. The tree spans both experts (at shift 12, 13 of the 20 steps are the
# high-noise expert's); TRAIN_EXPERTS=high|low trains one. VARIANT=base|widpru|deppru|mix as for FLUX.
# Environment and defaults: scripts/lib/wan22.sh and scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree
source scripts/lib/wan22.sh
