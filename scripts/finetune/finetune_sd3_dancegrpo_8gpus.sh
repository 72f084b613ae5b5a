#!/usr/bin/env bash
# DanceGRPO baseline on Stable Diffusion 3.5: 16 independent SDE trajectories per prompt (the tree's leaf count), 10
# steps, eta 0.3, shift 3, CFG 4.5. TF (timestep fraction, 1.0) trains a random share of the steps.
# Environment and defaults: scripts/lib/sd3.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TF="${TF:-1.0}"
ALGO_ARGS=(--algo dancegrpo --sampling_steps 10 --num_generations "${NUM_GENERATIONS:-16}" --eta 0.3
           --sde_kernel dance --timestep_fraction "$TF" --clip_range 1e-4 --init_same_noise)
NAME="dancegrpo_tf${TF}"
source scripts/lib/sd3.sh
