#!/usr/bin/env bash
# DanceGRPO baseline on Qwen-Image: 12 independent SDE trajectories per prompt, 20 steps, eta 0.3, true CFG 4.0.
# TF (timestep fraction) 1.0 trains every step (default), TF=0.6 a random 60% of them.
# Environment and defaults: scripts/lib/qwen_image.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TF="${TF:-1.0}"
ALGO_ARGS=(--algo dancegrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-12}" --eta 0.3
           --sde_kernel dance --timestep_fraction "$TF" --clip_range 1e-3 --init_same_noise)
NAME="dancegrpo_tf${TF}"
source scripts/lib/qwen_image.sh
