#!/usr/bin/env bash
# DanceGRPO baseline on FLUX.1-dev: 12 independent SDE trajectories per prompt, 20 steps, eta 0.3, shift 3.
# TF (timestep fraction) 1.0 trains every step (default), TF=0.6 a random 60% of them (the paper's two rows).
# Environment and defaults: scripts/lib/flux.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TF="${TF:-1.0}"
ALGO_ARGS=(--algo dancegrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-12}" --eta 0.3
           --sde_kernel dance --timestep_fraction "$TF" --clip_range 1e-3 --init_same_noise)
NAME="dancegrpo_tf${TF}"
source scripts/lib/flux.sh
