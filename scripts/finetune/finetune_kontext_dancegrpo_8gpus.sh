#!/usr/bin/env bash
# DanceGRPO baseline on FLUX.1-Kontext-dev (instruction-based image editing): 12 independent SDE trajectories per
# edit, 20 steps, eta 0.3; TF (timestep fraction, 1.0) as for FLUX. Settings as the BranchGRPO Kontext launcher
# (512 x 512, guidance 2.5, the pipeline's dynamic shift, the edit rewards). Environment: scripts/lib/flux_kontext.sh
# and scripts/lib/flux.sh. Extra flags go to the trainer. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TF="${TF:-1.0}"
ALGO_ARGS=(--algo dancegrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-12}" --eta 0.3
           --sde_kernel dance --timestep_fraction "$TF" --clip_range 1e-3 --init_same_noise)
NAME="dancegrpo_tf${TF}"
source scripts/lib/common.sh
source scripts/lib/flux_kontext.sh
source scripts/lib/flux.sh
