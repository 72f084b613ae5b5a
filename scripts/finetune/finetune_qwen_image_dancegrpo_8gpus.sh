#!/usr/bin/env bash
# DanceGRPO baseline on Qwen-Image: 12 independent SDE trajectories per prompt, 20 steps, eta 0.3, true CFG 4.0.
# TF (timestep fraction) 1.0 trains every step (default), TF=0.6 a random 60% of them.
# Environment and defaults: scripts/lib/qwen_image.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 12 20 --clip_range 1e-3
source scripts/lib/qwen_image.sh
