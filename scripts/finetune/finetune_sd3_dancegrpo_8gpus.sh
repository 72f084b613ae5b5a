#!/usr/bin/env bash
# DanceGRPO baseline on Stable Diffusion 3.5: 16 independent SDE trajectories per prompt (the tree's leaf count), 10
# steps, eta 0.3, shift 3, CFG 4.5. TF (timestep fraction, 1.0) trains a random share of the steps.
# Environment and defaults: scripts/lib/sd3.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 16 10 --clip_range 1e-4
source scripts/lib/sd3.sh
