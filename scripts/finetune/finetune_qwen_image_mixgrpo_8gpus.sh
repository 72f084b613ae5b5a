#!/usr/bin/env bash
# MixGRPO baseline on Qwen-Image: 12 trajectories per prompt, SDE (flow kernel, eta 0.7) only inside a window of 5
# steps that moves one step every 25 iterations; ODE elsewhere; only window steps trained (MixGRPO (20,5)).
# Environment and defaults: scripts/lib/qwen_image.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
ALGO_ARGS=(--algo mixgrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-12}" --sde_kernel flow --eta 0.7
           --mix_sde_window_size "${WINDOW:-5}" --mix_window_interval 25 --mix_window_stride 1 --clip_range 1e-3
           --init_same_noise)
NAME="mixgrpo"
source scripts/lib/qwen_image.sh
