#!/usr/bin/env bash
# DanceGRPO on Wan2.2 T2V-A14B (two experts), one node of 8 GPUs: 20 steps, 16 videos per prompt, eta 0.3, a
# timestep fraction TF (1.0) of the steps trained; the A14B recipe's shift 12 and guidance 4.0 / 3.0, LoRA by default.
# Environment and defaults: scripts/lib/wan22.sh and scripts/lib/wan.sh (NUM_GENERATIONS: 16). Extra flags go to the
# trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 16 20
source scripts/lib/wan22.sh
