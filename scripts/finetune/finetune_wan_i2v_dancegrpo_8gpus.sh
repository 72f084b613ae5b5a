#!/usr/bin/env bash
# DanceGRPO baseline on Wan2.1 image-to-video (Wan2.1-I2V-14B-480P): 16 independent SDE trajectories per prompt (the
# tree's leaf count), 20 steps, eta 0.3, CFG 5.0, VideoAlign motion quality (DanceGRPO's image-to-video reward);
# TF (timestep fraction, 1.0) trains a random share of the steps. Prompts: preprocess_wan_i2v_rl_embeddings.sh.
# Environment and defaults: scripts/lib/wan.sh. Extra flags go to the trainer. See docs/wan.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TF="${TF:-1.0}"
ALGO_ARGS=(--algo dancegrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-16}" --eta 0.3 --sde_kernel dance
           --timestep_fraction "$TF" --init_same_noise)
NAME="dancegrpo_tf${TF}"
WAN_BACKBONE=wan_i2v
WAN_CHECKPOINT="Wan2.1-I2V-14B-480P (or -720P)"
source scripts/lib/wan.sh
