#!/usr/bin/env bash
# MixGRPO on Wan2.2 T2V-A14B (two experts), one node of 8 GPUs: FLUX's MixGRPO settings (20 steps, 12 videos per
# prompt, flow SDE kernel at eta 0.7 inside a sliding window of WINDOW (5) steps, ODE elsewhere) at the A14B recipe's
# shift 12 and guidance 4.0 / 3.0, LoRA by default. The window slides from the high-noise expert's steps into the
# low-noise expert's, so each expert trains while the window is in its range.
# Environment and defaults: scripts/lib/wan22.sh and scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
ALGO_ARGS=(--algo mixgrpo --sampling_steps 20 --num_generations "${NUM_GENERATIONS:-12}" --sde_kernel flow --eta 0.7
           --mix_sde_window_size "${WINDOW:-5}" --mix_window_interval 25 --mix_window_stride 1 --clip_range 1e-3
           --init_same_noise)
NAME="mixgrpo"
source scripts/lib/wan22.sh
