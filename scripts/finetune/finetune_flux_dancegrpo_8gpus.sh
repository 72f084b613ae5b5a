#!/usr/bin/env bash
# DanceGRPO baseline on FLUX.1-dev: 12 independent SDE trajectories per prompt, 20 steps, eta 0.3, shift 3.
# TF (timestep fraction) 1.0 trains every step (default), TF=0.6 a random 60% of them (the paper's two rows).
# Environment and defaults: scripts/lib/flux.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 12 20 --clip_range 1e-3
source scripts/lib/flux.sh
