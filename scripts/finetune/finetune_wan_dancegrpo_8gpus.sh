#!/usr/bin/env bash
# DanceGRPO baseline on Wan2.1-T2V-1.3B: 16 independent SDE trajectories per prompt (the tree's leaf count), 20 steps,
# eta 0.3, CFG 5.0, VideoAlign motion quality; TF (timestep fraction, 1.0) trains a random share of the steps.
# Environment and defaults: scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TF="${TF:-1.0}"
ALGO_ARGS=(--algo dancegrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-16}" --eta 0.3 --sde_kernel dance
           --timestep_fraction "$TF" --init_same_noise)
NAME="dancegrpo_tf${TF}"
source scripts/lib/wan.sh
