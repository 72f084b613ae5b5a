#!/usr/bin/env bash
# MixGRPO baseline on Stable Diffusion 3.5: 16 trajectories per prompt, SDE (flow kernel, eta 0.7: Flow-GRPO's noise
# level) only inside a window of 3 of the 10 steps that moves one step every 25 iterations; ODE elsewhere; only window
# steps trained. Environment: scripts/lib/sd3.sh.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
ALGO_ARGS=(--algo mixgrpo --sampling_steps 10 --num_generations "${NUM_GENERATIONS:-16}" --sde_kernel flow --eta 0.7
           --mix_sde_window_size "${WINDOW:-3}" --mix_window_interval 25 --mix_window_stride 1 --clip_range 1e-4
           --init_same_noise)
NAME="mixgrpo"
source scripts/lib/sd3.sh
