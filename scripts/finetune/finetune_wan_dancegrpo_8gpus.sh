#!/usr/bin/env bash
# DanceGRPO baseline on Wan2.1-T2V-1.3B: 16 independent SDE trajectories per prompt (the tree's leaf count), 20 steps,
# eta 0.3, CFG 5.0, VideoAlign motion quality; TF (timestep fraction, 1.0) trains a random share of the steps.
# Environment and defaults: scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 16 20
source scripts/lib/wan.sh
